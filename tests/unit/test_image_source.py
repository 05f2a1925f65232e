"""The image server client (vmhost.providers.image_source) against a real HTTP server on 127.0.0.1, no
hypervisor: verified downloads, time limits, size ceilings and one sentence for each failure; then how the
CLI, the charm config and the prune-images action pass the server on."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from ops import testing

import charm
from charm_config import CharmConfig, PruneImagesParams
from tests.functional.simplestreams_index import ImageIndex, Product
from tests.unit.fakes import FakeProvider
from tests.unit.juju_cli import charm_context
from vmhost import cli
from vmhost.providers import image_source
from vmhost.providers import lxd_config as cfg
from vmhost.providers.image_source import ImageError, ImageServer
from vmhost.simplestreams import DEFAULT_IMAGE_SERVER


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"QFI\xfb" + bytes(range(256)) * 4000)
    return p


def _collect(server: ImageServer, f) -> bytes:
    parts: list[bytes] = []
    server.download(f, parts.append)
    return b"".join(parts)


def test_resolve_and_download_verify_the_stream(tmp_path, disk):
    with ImageIndex(tmp_path / "idx", [Product("ubuntu", "noble", "24.04", {"disk1.img": disk})]) as index:
        server = ImageServer(index.url, arch="amd64")
        found = server.resolve("ubuntu:24.04", "disk")
        assert found.disk.sha256 == hashlib.sha256(disk.read_bytes()).hexdigest()
        assert _collect(server, found.disk) == disk.read_bytes()
        with pytest.raises(ImageError, match=f"image server {index.url} has no disk image named 'ubuntu:jammy'"):
            server.resolve("ubuntu:jammy", "disk")
        with pytest.raises(ImageError, match="is not an image name"):
            server.resolve("ubuntu:", "disk")


def test_a_checksum_or_size_that_does_not_match_is_refused(tmp_path, disk):
    bad = Product("ubuntu", "noble", "24.04", {"disk1.img": disk}, sha256={"disk1.img": "0" * 64})
    with ImageIndex(tmp_path / "idx", [bad]) as index:
        server = ImageServer(index.url, arch="amd64")
        f = server.resolve("ubuntu:noble", "disk").disk
        with pytest.raises(ImageError, match="does not match its stream's sha256"):
            _collect(server, f)
        from dataclasses import replace

        with pytest.raises(ImageError, match="is larger than"):
            _collect(server, replace(f, size=f.size - 1))
        with pytest.raises(ImageError, match="not the"):
            _collect(server, replace(f, size=f.size + 1))


def test_unreachable_missing_and_oversized_documents_are_one_sentence(tmp_path, disk, monkeypatch):
    with pytest.raises(ImageError, match=r"image server http://127\.0\.0\.1:9 is unreachable"):
        ImageServer("http://127.0.0.1:9").resolve("ubuntu:noble", "disk")
    empty = tmp_path / "empty"
    empty.mkdir()
    with ImageIndex(empty, []) as index:
        (empty / "streams/v1/index.json").unlink()
        with pytest.raises(ImageError, match=r"answered 404 for streams/v1/index\.json"):
            ImageServer(index.url).resolve("ubuntu:noble", "disk")
    with ImageIndex(tmp_path / "idx", [Product("ubuntu", "noble", "24.04", {"disk1.img": disk})]) as index:
        monkeypatch.setattr(image_source, "PRODUCTS_MAX", 100)
        with pytest.raises(ImageError, match="is larger than 100 bytes"):
            ImageServer(index.url, arch="amd64").resolve("ubuntu:noble", "disk")


def test_a_server_that_never_answers_costs_a_bounded_wait(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    monkeypatch.setattr(image_source, "HTTP_TIMEOUT", 0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(ImageError, match=r"image server http://127\.0\.0\.1:\d+ (is unreachable|stopped sending)"):
            ImageServer(f"http://127.0.0.1:{listener.getsockname()[1]}").resolve("ubuntu:noble", "disk")
    finally:
        listener.close()
        for s in held:
            s.close()
    assert time.monotonic() - t0 < 5


def _raw_server(answer: bytes) -> socket.socket:
    """A TCP server on 127.0.0.1 that answers every request with `answer` and hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n{}",  # more headers than http.client reads
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n{}",  # a header line too long
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",  # a chunk size that is not one
    ],
    ids=["not-http", "many-headers", "long-header", "bad-chunk"],
)
def test_a_server_that_does_not_speak_http_is_one_sentence(answer):
    listener = _raw_server(answer)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(
            ImageError,
            match=rf"^image server {re.escape(url)} (did not answer streams/v1/index\.json in HTTP|broke off sending)",
        ):
            ImageServer(url).resolve("ubuntu:noble", "disk")
    finally:
        listener.close()


def test_a_server_that_drips_its_headers_costs_a_bounded_wait(monkeypatch):
    """Each byte comes within the per-read limit, the headers never end: the document's limit still holds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.1):
                try:
                    conn.sendall(b"X")  # a header line that never ends
                except OSError:
                    return

    threading.Thread(target=drip, daemon=True).start()
    monkeypatch.setattr(image_source, "HTTP_TIMEOUT", 0.5)
    monkeypatch.setattr(image_source, "DOCUMENT_TIMEOUT", 1.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    t0 = time.monotonic()
    try:
        with pytest.raises(
            ImageError, match=rf"^image server {re.escape(url)} took too long to send streams/v1/index\.json"
        ):
            ImageServer(url).resolve("ubuntu:noble", "disk")
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - t0 < 5


@pytest.fixture
def names(monkeypatch):
    """The resolver, with `mirror.test` at 127.0.0.1 and `hung.test` a lookup that never ends (until teardown)."""
    real, stuck = socket.getaddrinfo, threading.Event()

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "hung.test":
            stuck.wait(30)
            raise socket.gaierror("released")
        return real("127.0.0.1" if host == "mirror.test" else host, port, *args, **kwargs)

    monkeypatch.setattr(image_source.socket, "getaddrinfo", getaddrinfo)
    yield
    stuck.set()


def test_a_name_lookup_that_never_ends_costs_a_bounded_wait(names, monkeypatch):
    monkeypatch.setattr(image_source, "RESOLVE_TIMEOUT", 0.5)
    t0 = time.monotonic()
    with pytest.raises(
        ImageError,
        match=r"image server http://hung\.test is unreachable: looking up hung\.test took longer than 0\.5 s",
    ):
        ImageServer("http://hung.test").resolve("ubuntu:noble", "disk")
    assert time.monotonic() - t0 < 3


def test_a_redirect_off_http_is_refused_without_a_lookup(names, monkeypatch):
    """Only http(s) is followed: urllib's ftp handler would look the name up with no time limit."""
    looked_up: list[str] = []
    monkeypatch.setattr(image_source.socket, "gethostbyname", lambda host: looked_up.append(host) or time.sleep(30))
    for target in ("ftp://hung.test/streams/v1/index.json", "file:///etc/passwd", "data:,{}"):
        answer = f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode()
        listener = _raw_server(answer)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        try:
            with pytest.raises(ImageError, match=rf"^image server {re.escape(url)} (is unreachable|answered 302)"):
                ImageServer(url).resolve("ubuntu:noble", "disk")
        finally:
            listener.close()
        assert time.monotonic() - t0 < 5 and looked_up == []


def test_servers_named_by_host_name_are_reached_and_tls_still_checks_that_name(names, tmp_path, disk):
    product = Product("ubuntu", "noble", "24.04", {"disk1.img": disk})
    with ImageIndex(tmp_path / "plain", [product]) as index:
        port = index.url.rsplit(":", 1)[1]
        assert ImageServer(f"http://mirror.test:{port}", arch="amd64").resolve("ubuntu:noble", "disk").disk.size > 0
    with ImageIndex(tmp_path / "tls", [product], tls=True) as index:
        port, cert = index.url.rsplit(":", 1)[1], str(index.cert)
        # localhost may be ::1 first, where nothing listens: the next address is tried.
        found = ImageServer(f"https://localhost:{port}", cafile=cert, arch="amd64").resolve("ubuntu:noble", "disk")
        assert found.disk.size == disk.stat().st_size
        with pytest.raises(ImageError, match=r"https://mirror\.test:\d+ is unreachable: .*(hostname|match)"):
            ImageServer(f"https://mirror.test:{port}", cafile=cert, arch="amd64").resolve("ubuntu:noble", "disk")


def test_a_bad_server_or_certificate_is_refused_when_the_provider_is_made(tmp_path):
    with pytest.raises(ImageError, match="is not an http"):
        ImageServer("file:///etc")
    with pytest.raises(ImageError, match="is not a readable PEM certificate file"):
        ImageServer("https://mirror", cafile=str(tmp_path / "missing.pem"))


def test_a_certificate_lxd_cannot_be_handed_whole_is_one_sentence(tmp_path):
    """LXD's pull source takes one certificate: a bundle past CERT_MAX was cut mid-PEM, a vanished file
    was a FileNotFoundError."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())  # hundreds of certificates
    server = ImageServer("https://mirror", cafile=str(bundle))  # vm-host itself trusts the whole bundle
    with pytest.raises(ImageError, match=r"^image server certificate .*bundle\.pem' is larger than 65536 bytes;"):
        server.certificate()
    bundle.unlink()
    with pytest.raises(ImageError, match=r"^image server certificate .*bundle\.pem' cannot be read:"):
        server.certificate()


def test_lxd_pulls_over_https_only_and_by_fingerprint():
    src = cfg.pull_source("https://mirror/releases", "f" * 64, "PEM")
    assert src == {
        "type": "image",
        "mode": "pull",
        "server": "https://mirror/releases",
        "protocol": "simplestreams",
        "fingerprint": "f" * 64,
        "certificate": "PEM",
    }
    with pytest.raises(ValueError, match="LXD pulls images over https only"):
        cfg.pull_source("http://mirror", "f" * 64)


# -- the front ends ---------------------------------------------------------------------------------


def _cli_settings(monkeypatch, argv, env=None):
    made = []
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cli, "make_provider", lambda s: made.append(s) or FakeProvider())
    assert cli.main(argv) == 0
    return made[0]


def test_cli_passes_the_image_server_from_its_flag_or_the_environment(monkeypatch, capsys):
    s = _cli_settings(monkeypatch, ["images", "list", "--image-server", "http://127.0.0.1:8000"])
    assert s.options["image_server"] == "http://127.0.0.1:8000"
    s = _cli_settings(monkeypatch, ["images", "prune"], {"VMHOST_IMAGE_SERVER": "https://m/r"})
    assert s.options["image_server"] == "https://m/r"
    monkeypatch.delenv("VMHOST_IMAGE_SERVER")
    assert "image_server" not in _cli_settings(monkeypatch, ["list"]).options  # the provider's default
    out = capsys.readouterr().out
    assert "no base images" in out and "nothing to prune" in out


@pytest.mark.parametrize(
    ("given", "passed"),
    [
        ("ubuntu:24.04", "ubuntu:24.04"),
        ("imgs/noble.qcow2", None),
        ("noble", "noble"),
    ],
)
def test_cli_leaves_stream_names_alone_and_makes_paths_absolute(monkeypatch, tmp_path, given, passed):
    monkeypatch.chdir(tmp_path)
    provider = FakeProvider()
    monkeypatch.setattr(cli, "make_provider", lambda s: provider)
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "lock"))
    argv = ["compose", "--memory", "128M", "--storage", "root:1", "--boot", "image", "--image", given]
    assert cli.main(argv) == 0
    assert provider.composed[0].image == (passed or str(tmp_path / given))


def test_a_stream_name_with_a_slash_is_refused_as_typed_not_as_a_path(monkeypatch, tmp_path, capsys):
    provider = FakeProvider()
    monkeypatch.setattr(cli, "make_provider", lambda s: provider)
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "lock"))
    argv = ["compose", "--memory", "128M", "--storage", "root:1", "--boot", "image", "--image", "ubuntu:no/ble"]
    assert cli.main(argv) == 1
    assert "image 'ubuntu:no/ble' is not an image name" in capsys.readouterr().err
    assert provider.composed == []


def test_cli_refuses_a_bad_image_server_in_one_line(capsys):
    assert cli.main(["images", "list", "--backend", "libvirt", "--image-server", "ftp://x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmhost: error: image server 'ftp://x' is not an http(s) URL") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("value", "ok"),
    [("https://mirror.example/ubuntu", True), ("http://10.0.0.1:8080/releases", True), ("ftp://x", False), ("", False)],
)
def test_charm_config_image_server_is_validated(value, ok):
    base = {"backend": "libvirt"}
    if ok:
        assert CharmConfig(**base, image_server=value).image_server == value
    else:
        with pytest.raises(ValueError, match="is not an http"):
            CharmConfig(**base, image_server=value)
    assert CharmConfig(**base).image_server == DEFAULT_IMAGE_SERVER


def test_prune_images_action_passes_dry_run_and_reports_what_it_removed(monkeypatch):
    class Pruning(FakeProvider):
        def prune_images(self, dry_run=False):
            self.pruned = dry_run
            return ["default/vmhost-base-1"]

        def images(self):
            return [{"pool": "default", "volume": "vmhost-base-2"}]

    made: list = []
    monkeypatch.setattr(charm, "make_provider", lambda s: made.append((s, Pruning())) or made[-1][1])
    ctx = charm_context()
    config = {"backend": "libvirt", "image-server": "http://127.0.0.1:8000"}
    ctx.run(ctx.on.action("prune-images", params={"dry_run": True}), testing.State(config=config))
    assert ctx.action_results == {
        "removed": '["default/vmhost-base-1"]',
        "kept": '["default/vmhost-base-2"]',
        "dry-run": "true",
    }
    settings, provider = made[0]
    assert provider.pruned is True and settings.options["image_server"] == "http://127.0.0.1:8000"
    with pytest.raises(ValueError):
        PruneImagesParams(dry_run=True, force=True)


# -- the record of base images (libvirt_images), without a daemon -------------------------------------


def test_overlay_volume_xml_names_its_backing_store():
    from vmhost.providers.libvirt_images import volume_xml

    xml = ET.fromstring(volume_xml("vmhost-vm-1-root", 128 * 1024**2, "qcow2", backing=("/p/vmhost-base-ab", "qcow2")))
    assert xml.findtext("backingStore/path") == "/p/vmhost-base-ab"
    assert xml.find("backingStore/format").get("type") == "qcow2"
    assert xml.find("target/format").get("type") == "qcow2" and xml.findtext("capacity") == str(128 * 1024**2)


_RECORD = {
    "volume": "vmhost-base-" + "a" * 32,
    "sha256": "a" * 64,
    "image": "ubuntu:noble",
    "server": "https://m",
    "version": "1",
    "format": "qcow2",
    "state": "ready",
    "created": 1.5,
}


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"format": "other", "bases": []}',
        b'{"format": "vmhost-bases:1", "bases": [1]}',
        b"[" * 10**5,
        # Records that name what is not a base: prune would delete that volume, list would hand libvirt a number.
        *(
            json.dumps({"format": "vmhost-bases:1", "bases": [{**_RECORD, **bad}]}).encode()
            for bad in (
                {"volume": "vmhost-web-1-root"},
                {"volume": "precious"},
                {"volume": "vmhost-base-" + "a" * 31 + "/"},
                {"volume": 5},
                {"sha256": None},
                {"state": "gone"},
                {"format": "vmdk"},
                {"created": "yesterday"},
            )
        ),
    ],
)
def test_a_record_of_bases_that_is_not_ours_is_one_sentence(data):
    from vmhost.providers.base import ProviderError
    from vmhost.providers.libvirt_images import _decode_registry

    with pytest.raises(ProviderError, match="is not vm-host's record of base images"):
        _decode_registry(data, "default")


def test_the_record_of_bases_reads_back_and_gc_leaves_bases_alone():
    from vmhost.providers.libvirt_images import BaseRecord, _decode_registry, is_base

    doc = {
        "format": "vmhost-bases:1",
        "bases": [
            {
                "volume": "vmhost-base-" + "a" * 32,
                "sha256": "a" * 64,
                "image": "ubuntu:noble",
                "server": "https://m",
                "version": "1",
                "state": "ready",
                "extra": 1,
            }
        ],
    }
    padded = json.dumps(doc).encode().ljust(4096, b" ")
    assert _decode_registry(padded, "default") == [
        BaseRecord("vmhost-base-" + "a" * 32, "a" * 64, "ubuntu:noble", "https://m", "1", state="ready")
    ]
    assert is_base("vmhost-base-ab") and is_base("vmhost-bases.json") and not is_base("vmhost-vm-1-root")


def _qcow2_head(version: int = 3, backing_offset: int = 0, incompatible: int = 0) -> bytes:
    head = bytearray(104)
    head[0:4] = b"QFI\xfb"
    head[4:8] = version.to_bytes(4, "big")
    head[8:16] = backing_offset.to_bytes(8, "big")
    head[24:32] = (64 * 1024**2).to_bytes(8, "big")
    head[72:80] = incompatible.to_bytes(8, "big")
    return bytes(head)


@pytest.mark.parametrize(
    ("head", "what"),
    [
        (_qcow2_head(backing_offset=0x200), "backing file"),
        (_qcow2_head(version=2, backing_offset=0x200), "backing file"),
        (_qcow2_head(incompatible=0b100), "external data file"),
        (_qcow2_head(incompatible=0b101), "external data file"),  # dirty as well
    ],
)
def test_a_qcow2_base_naming_another_host_file_is_refused(head, what):
    from vmhost.providers.base import ProviderError
    from vmhost.providers.libvirt_images import check_self_contained

    with pytest.raises(ProviderError, match=f"^image ubuntu:noble names a {what} in its qcow2 header;"):
        check_self_contained(head, "image ubuntu:noble")


@pytest.mark.parametrize(
    "head", [_qcow2_head(), _qcow2_head(version=2, incompatible=0b100), _qcow2_head(incompatible=0b11)]
)
def test_a_self_contained_qcow2_base_passes(head):
    from vmhost.providers.libvirt_images import check_self_contained

    check_self_contained(head, "image ubuntu:noble")  # v2 has no feature bits: bytes 72-80 are not a header field
