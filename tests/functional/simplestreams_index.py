"""A simplestreams image server on 127.0.0.1 for tests: give it files, it writes the index and serves them.

Generic on purpose (any product, os, release, aliases, version and file types), so any tier can serve its
own image through it. It computes each file's sha256 and size, and for an LXD VM image (an lxd.tar.xz next
to a disk-kvm.img, uefi1.img or disk1.img) the combined sha256 LXD names the image by. It counts the
requests per path (to prove what was, or was not, downloaded) and can serve https with a self-signed
certificate for 127.0.0.1 (LXD pulls over https only).

    with ImageIndex(tmp_path, [Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2})]) as index:
        provider = LibvirtProvider(image_server=index.url)
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

LXD_DISKS = {
    "disk-kvm.img": "combined_disk-kvm-img_sha256",
    "uefi1.img": "combined_uefi1-img_sha256",
    "disk1.img": "combined_disk1-img_sha256",
}
DATATYPE_ID = "com.vmhost.test:download"


def sha256_of(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(1024**2):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class Product:
    """One product with one version; `files` maps a file type (disk1.img, lxd.tar.xz, ...) to a local file.

    `sha256` overrides the index's sha256 per file type (to serve a checksum that does not match)."""

    os: str
    release: str
    version: str
    files: dict[str, Path]
    aliases: tuple[str, ...] = ()
    serial: str = "20250101"
    arch: str = "amd64"
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def product_id(self) -> str:
        return f"com.vmhost.test:{self.os}:{self.version}:{self.arch}"


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-file (vm-host refusing an image at its header) is expected, not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ImageIndex:
    """Serves `products` from `root` (a fresh directory) on 127.0.0.1; `tls` makes it https."""

    def __init__(self, root: Path, products: list[Product], tls: bool = False):
        self.root = Path(root)
        self.products = products
        self.tls = tls
        self.requests: Counter[str] = Counter()
        self.cert: Path | None = None
        self._server: http.server.ThreadingHTTPServer | None = None

    # -- the documents ------------------------------------------------------------------------

    def write(self) -> None:
        table = {}
        for p in self.products:
            items = {}
            for ftype, src in p.files.items():
                rel = f"images/{p.os}/{p.release}/{p.serial}/{p.arch}/{ftype}"
                dest = self.root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
                items[ftype] = {
                    "ftype": ftype,
                    "path": rel,
                    "sha256": p.sha256.get(ftype, sha256_of(dest)),
                    "size": dest.stat().st_size,
                }
            if "lxd.tar.xz" in p.files:
                for ftype, key in LXD_DISKS.items():
                    if ftype in p.files:
                        items["lxd.tar.xz"][key] = sha256_of(p.files["lxd.tar.xz"], p.files[ftype])
            table[p.product_id] = {
                "os": p.os,
                "release": p.release,
                "version": p.version,
                "arch": p.arch,
                "aliases": ",".join(p.aliases),
                "release_title": p.version,
                "versions": {p.serial: {"items": items}},
            }
        products_path = f"streams/v1/{DATATYPE_ID}.json"
        products = {"content_id": DATATYPE_ID, "datatype": "image-downloads", "format": "products:1.0"}
        products["products"] = table
        index = {
            "format": "index:1.0",
            "index": {
                DATATYPE_ID: {
                    "datatype": "image-downloads",
                    "format": "products:1.0",
                    "path": products_path,
                    "products": sorted(table),
                }
            },
        }
        (self.root / "streams/v1").mkdir(parents=True, exist_ok=True)
        (self.root / products_path).write_text(json.dumps(products))
        (self.root / "streams/v1/index.json").write_text(json.dumps(index))

    def item(self, product: Product, ftype: str) -> dict:
        doc = json.loads((self.root / f"streams/v1/{DATATYPE_ID}.json").read_text())
        return doc["products"][product.product_id]["versions"][product.serial]["items"][ftype]

    # -- serving ----------------------------------------------------------------------------------

    def _make_cert(self) -> ssl.SSLContext:
        crt, key = self.root.parent / "index.crt", self.root.parent / "index.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(crt)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.cert = crt
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        return ctx

    def __enter__(self) -> ImageIndex:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write()
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(index.root), **kwargs)

            def do_GET(self):
                index.requests[self.path.split("?", 1)[0].lstrip("/")] += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        if self.tls:
            self._server.socket = self._make_cert().wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "serve the index first (with ImageIndex(...) as index)"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def downloads(self, ftype: str) -> int:
        """How many times a file of this type was asked for."""
        return sum(n for path, n in self.requests.items() if path.endswith(f"/{ftype}"))
