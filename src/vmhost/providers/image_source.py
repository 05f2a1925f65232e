"""An image server (simplestreams over http(s)): resolve a stream name, and download a file verified.

Every request has a time limit on each network wait (HTTP_TIMEOUT) and on the whole (documents:
DOCUMENT_TIMEOUT, an image: IMAGE_TIMEOUT), and every body a size ceiling (vmhost.simplestreams); what
goes wrong is one ProviderError sentence naming the server, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import platform
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from vmhost.providers.base import ProviderError
from vmhost.simplestreams import (
    DEFAULT_IMAGE_SERVER,
    INDEX_MAX,
    INDEX_PATH,
    PRODUCTS_MAX,
    Kind,
    StreamError,
    StreamFile,
    StreamImage,
    check_server,
    decode,
    parse_image_name,
    products_paths,
    select,
    server_url,
)
from vmhost.timeouts import IMAGE_TIMEOUT, RESOLVE_TIMEOUT, resolve

HTTP_TIMEOUT = 30.0  # s: connecting, or waiting for the next bytes of a body
DOCUMENT_TIMEOUT = 120.0  # s: one whole index or products document
CHUNK = 1024**2
CERT_MAX = 64 * 1024  # characters of a PEM certificate handed to LXD
# Python's machine names -> simplestreams' (Debian) architecture names.
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64"}


def host_arch() -> str:
    machine = platform.machine()
    return ARCHES.get(machine, machine)


def _connect(address: tuple[str, int], timeout: float | None = None, source_address=None, **_: object):
    """socket.create_connection, with the name lookup bounded by RESOLVE_TIMEOUT."""
    host, port = address
    error: OSError | None = None
    for *_kind, sockaddr in resolve(host, port, RESOLVE_TIMEOUT):
        try:
            return socket.create_connection(sockaddr[:2], timeout, source_address)
        except OSError as e:
            error = e
    raise error or OSError(f"{host} has no address")


class _Sockets:
    """The sockets of the request being opened, so a watchdog can cut them off at its deadline: each read
    has HTTP_TIMEOUT, but a server that sends its status line and headers a byte at a time never trips it."""

    def __init__(self) -> None:
        self.live: list[socket.socket] = []

    def connect(self, *args, **kwargs) -> socket.socket:
        sock = _connect(*args, **kwargs)
        self.live.append(sock)
        return sock

    def cut(self) -> None:
        for sock in self.live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, sockets: _Sockets, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = sockets.connect  # http.client's own hook for how the socket is made


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, sockets: _Sockets, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = sockets.connect  # TLS still checks the server's name, not the address


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, sockets: _Sockets):
        super().__init__()
        self._sockets = sockets

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, sockets=self._sockets), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, sockets: _Sockets, context: ssl.SSLContext | None):
        super().__init__(context=context)
        self._sockets = sockets

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, sockets=self._sockets), req, context=self._context)


class ImageError(ProviderError):
    """The image server could not give the image (unreachable, unknown name, bad document, bad checksum)."""


class ImageNotFound(ImageError):
    """The server answered, and has no image by that name: the asker's mistake, not the host's."""


class ImageServer:
    """One simplestreams server. `cafile`: a PEM certificate to trust for https (a private mirror)."""

    def __init__(self, url: str | None = None, cafile: str | None = None, arch: str | None = None):
        try:
            self.url = check_server(url or DEFAULT_IMAGE_SERVER)
        except StreamError as e:
            raise ImageError(str(e)) from None
        self.cafile = cafile
        self.arch = arch or host_arch()
        try:
            context = ssl.create_default_context(cafile=cafile) if cafile else None
        except OSError:  # ssl.SSLError is one too
            raise ImageError(f"image server certificate {cafile!r} is not a readable PEM certificate file") from None
        # http(s) only, redirects included: urllib's ftp handler would look a name up with no time limit.
        self._sockets = _Sockets()
        self._opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler(),
            _HTTPHandler(self._sockets),
            _HTTPSHandler(self._sockets, context),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPRedirectHandler(),
            urllib.request.HTTPErrorProcessor(),
            urllib.request.UnknownHandler(),
        ):
            self._opener.add_handler(handler)

    def certificate(self) -> str | None:
        """The PEM text of `cafile` (LXD's pull source takes it to trust a self-signed server)."""
        if not self.cafile:
            return None
        try:
            with open(self.cafile, encoding="ascii", errors="replace") as fh:
                text = fh.read(CERT_MAX + 1)
        except OSError as e:
            raise ImageError(f"image server certificate {self.cafile!r} cannot be read: {e.strerror or e}") from None
        if len(text) > CERT_MAX:
            raise ImageError(
                f"image server certificate {self.cafile!r} is larger than {CERT_MAX} bytes; LXD takes the server's "
                "own certificate (or its CA's), not a bundle"
            )
        return text

    def _open(self, path: str, deadline: float):
        """The response to GET `path`, its status and headers in by `deadline` (monotonic; redirects included)."""
        url = server_url(self.url, path)
        self._sockets.live = []
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), self._sockets.cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._opener.open(url, timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as e:
            raise ImageError(f"image server {self.url} answered {e.code} for {path}") from None
        except (http.client.HTTPException, urllib.error.URLError, OSError, ValueError) as e:
            if time.monotonic() >= deadline:  # the watchdog cut it off
                raise ImageError(f"image server {self.url} took too long to send {path}") from None
            if isinstance(e, http.client.HTTPException):  # not an OSError: a status line or headers not HTTP
                raise ImageError(
                    f"image server {self.url} did not answer {path} in HTTP ({type(e).__name__})"
                ) from None
            raise ImageError(f"image server {self.url} is unreachable: {getattr(e, 'reason', e)}") from None
        finally:
            watchdog.cancel()

    def _read(self, path: str, limit: int, sink: Callable[[bytes], None], deadline: float) -> int:
        """Stream `path` into `sink` in chunks; at most `limit` bytes, done by `deadline` (monotonic)."""
        resp = self._open(path, deadline)
        total = 0
        try:
            with resp:
                while True:
                    if time.monotonic() > deadline:
                        raise ImageError(f"image server {self.url} took too long to send {path}")
                    chunk = resp.read1(CHUNK)  # one network read: the deadline is checked between reads
                    if not chunk:
                        return total
                    total += len(chunk)
                    if total > limit:
                        raise ImageError(f"{path} on image server {self.url} is larger than {limit} bytes")
                    sink(chunk)
        except TimeoutError:
            raise ImageError(f"image server {self.url} stopped sending {path} for {HTTP_TIMEOUT:g} s") from None
        except (OSError, http.client.HTTPException) as e:  # HTTPException: a chunked body cut short or malformed
            raise ImageError(f"image server {self.url} broke off sending {path}: {e}") from None

    def document(self, path: str, limit: int) -> dict:
        parts: list[bytes] = []
        self._read(path, limit, parts.append, time.monotonic() + DOCUMENT_TIMEOUT)
        try:
            return decode(b"".join(parts), f"{path} on image server {self.url}", limit)
        except StreamError as e:
            raise ImageError(str(e)) from None

    def resolve(self, image: str, kind: Kind) -> StreamImage:
        """The newest image a stream name stands for on this server (kind: "disk" for libvirt, "lxd")."""
        try:
            name = parse_image_name(image)
            for path in products_paths(self.document(INDEX_PATH, INDEX_MAX)):
                found = select(self.document(path, PRODUCTS_MAX), name, self.arch, kind)
                if found is not None:
                    return found
        except StreamError as e:
            raise ImageError(str(e)) from None
        what = "disk image" if kind == "disk" else "LXD VM image"
        raise ImageNotFound(
            f"image server {self.url} has no {what} named {image!r} for {self.arch}; an alias is matched against "
            "the products' release, version and aliases"
        )

    def download(self, f: StreamFile, sink: Callable[[bytes], None], limit: float = IMAGE_TIMEOUT) -> None:
        """Send `f` to `sink` chunk by chunk, hashing as it goes; its size and sha256 must be the stream's.

        The caller undoes what `sink` made when this raises: the bytes are only good once it returns."""
        digest = hashlib.sha256()

        def take(chunk: bytes) -> None:
            digest.update(chunk)
            sink(chunk)

        got = self._read(f.path, f.size, take, time.monotonic() + limit)
        if got != f.size:
            raise ImageError(f"{f.path} on image server {self.url} is {got} bytes, not the {f.size} its stream says")
        if digest.hexdigest() != f.sha256:
            raise ImageError(
                f"{f.path} on image server {self.url} does not match its stream's sha256; nothing was kept"
            )


__all__ = ["HTTP_TIMEOUT", "ImageError", "ImageNotFound", "ImageServer", "host_arch"]
