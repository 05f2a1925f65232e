"""Image names and the simplestreams documents they resolve in: total, bounded, no I/O.

An `image=` value that holds a ':' and does not start with '/' is a stream name `<os>:<alias>`
(`ubuntu:24.04`, `ubuntu:noble`); anything else is a local name, as before (a file in the libvirt image
directory or an absolute path, an LXD alias). A stream name picks, on the image server, the products whose
`os` is <os>, whose `arch` is the host's, and whose `release`, `version` or one of whose comma-separated
`aliases` is <alias>; of their versions that carry the file type the backend needs, the newest (version
names compared as numbers, then as text; product id breaks a tie) wins (docs/design.md §12).

The documents come from a server vm-host does not control: every field is checked for type and size,
paths must stay under the server, and anything else is one sentence (StreamError), never a traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_IMAGE_SERVER = "https://cloud-images.ubuntu.com/releases"
INDEX_PATH = "streams/v1/index.json"
SERVER_URL_MAX = 512
INDEX_MAX = 4 * 1024**2  # bytes of streams/v1/index.json (Ubuntu's: about 10 KiB)
PRODUCTS_MAX = 128 * 1024**2  # bytes of one products file (Ubuntu's releases download stream: tens of MiB)
PRODUCTS_FILES_MAX = 8  # image-downloads entries of one index tried
IMAGE_MAX = 64 * 1024**4  # bytes of one image file
FIELD_MAX = 256  # characters of any name, alias or version string

# The files each backend boots from, most wanted first. libvirt takes the plain disk image (qcow2); LXD a
# VM image: its metadata tarball plus a disk, fingerprinted by the combined sha256 of both (as LXD does).
DISK_FTYPES = ("disk1.img", "disk-kvm.img")
LXD_META_FTYPE = "lxd.tar.xz"
LXD_DISK_FTYPES = {
    "disk-kvm.img": "combined_disk-kvm-img_sha256",
    "uefi1.img": "combined_uefi1-img_sha256",
    "disk1.img": "combined_disk1-img_sha256",
}
Kind = Literal["disk", "lxd"]

_NAME_RE = re.compile(r"([a-z][a-z0-9-]{0,31}):([A-Za-z0-9][A-Za-z0-9._+-]{0,63})")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PATH_RE = re.compile(r"[A-Za-z0-9._+~:/-]{1,1024}")
_SERVER_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%+/-]*)?")


class StreamError(ValueError):
    """A name, server URL or stream document vm-host cannot use; the message is one sentence."""


@dataclass(frozen=True)
class ImageName:
    os: str
    alias: str

    def __str__(self) -> str:
        return f"{self.os}:{self.alias}"


@dataclass(frozen=True)
class StreamFile:
    """One file of a product version, its path relative to the server."""

    ftype: str
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class StreamImage:
    """What a stream name resolved to: the disk (kind "disk"), or LXD's metadata and disk (kind "lxd") whose
    `fingerprint` is the combined sha256 LXD names the image by."""

    name: ImageName
    product: str
    version: str
    arch: str
    files: tuple[StreamFile, ...]
    fingerprint: str

    @property
    def disk(self) -> StreamFile:
        return self.files[-1]


def is_stream_name(image: str) -> bool:
    """The rule that tells a stream name from a local one: it holds ':' and is not an absolute path."""
    return ":" in image and not image.startswith("/")


def parse_image_name(text: str) -> ImageName:
    m = _NAME_RE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise StreamError(
            f"image {str(text)[:80]!r} is not an image name; use <os>:<alias> such as ubuntu:24.04 or ubuntu:noble "
            "(os: lower-case letters, digits, '-'; alias: letters, digits, '.', '_', '+', '-'; at most 64)"
        )
    return ImageName(m.group(1), m.group(2))


def check_server(url: str) -> str:
    """An image server: an http(s) URL of at most SERVER_URL_MAX characters, no credentials or query."""
    text = url.strip() if isinstance(url, str) else ""
    if not (0 < len(text) <= SERVER_URL_MAX and _SERVER_RE.fullmatch(text)):
        raise StreamError(
            f"image server {str(url)[:80]!r} is not an http(s) URL of at most {SERVER_URL_MAX} characters "
            f"without credentials or query; use e.g. {DEFAULT_IMAGE_SERVER}"
        )
    return text.rstrip("/")


def decode(data: bytes, what: str, limit: int) -> dict[str, Any]:
    """A JSON object of at most `limit` bytes; anything else (too big, not JSON, too deep) is one sentence."""
    if len(data) > limit:
        raise StreamError(f"{what} is larger than {limit // 1024**2} MiB; vm-host reads no bigger stream document")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise StreamError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise StreamError(f"{what} is not a JSON object")
    return doc


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= FIELD_MAX else None


def _rel_path(value: Any) -> str | None:
    """A path under the server: no scheme, no leading '/', no '..' segment."""
    if not isinstance(value, str) or not _PATH_RE.fullmatch(value) or value.startswith("/") or "://" in value:
        return None
    return None if ".." in value.split("/") else value


def products_paths(index: dict[str, Any]) -> list[str]:
    """The products files of an index's image-downloads entries (sorted by content id, at most PRODUCTS_FILES_MAX)."""
    entries = index.get("index")
    if not isinstance(entries, dict):
        raise StreamError("the image server's index has no 'index' object; is it a simplestreams server?")
    paths = []
    for cid in sorted(k for k in entries if isinstance(k, str)):
        entry = entries[cid]
        if not isinstance(entry, dict) or entry.get("datatype") != "image-downloads":
            continue
        if entry.get("format") not in (None, "products:1.0"):
            continue
        path = _rel_path(entry.get("path"))
        if path and path not in paths:
            paths.append(path)
    if not paths:
        raise StreamError("the image server's index lists no image-downloads products file")
    return paths[:PRODUCTS_FILES_MAX]


def _version_key(name: str) -> tuple:
    return (tuple(int(n) for n in re.findall(r"\d+", name)[:8]), name)


def _file(item: Any) -> StreamFile | None:
    if not isinstance(item, dict):
        return None
    ftype, path, sha, size = _text(item.get("ftype")), _rel_path(item.get("path")), item.get("sha256"), item.get("size")
    if not (ftype and path and isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= IMAGE_MAX:
        return None
    return StreamFile(ftype, path, sha, size)


def _pick(items: dict[str, Any], kind: Kind) -> tuple[tuple[StreamFile, ...], str] | None:
    """The files of one version the backend boots from, and the image's fingerprint; None if it has none."""
    files: dict[str, tuple[StreamFile, dict]] = {}
    for item in items.values():
        f = _file(item)
        if f is not None and f.ftype not in files:
            files[f.ftype] = (f, item)
    if kind == "disk":
        for ftype in DISK_FTYPES:
            if ftype in files:
                return (files[ftype][0],), files[ftype][0].sha256
        return None
    if LXD_META_FTYPE not in files:
        return None
    meta, meta_item = files[LXD_META_FTYPE]
    for ftype, field in LXD_DISK_FTYPES.items():
        combined = meta_item.get(field)
        if ftype in files and isinstance(combined, str) and _SHA256_RE.fullmatch(combined):
            return (meta, files[ftype][0]), combined
    return None


def _matches(product: dict[str, Any], name: ImageName, arch: str) -> bool:
    if _text(product.get("os")) != name.os or _text(product.get("arch")) != arch:
        return False
    aliases = product.get("aliases")
    names = {_text(product.get("release")), _text(product.get("version"))}
    if isinstance(aliases, str) and len(aliases) <= 16 * FIELD_MAX:
        names.update(a.strip() for a in aliases.split(","))
    return name.alias in names


def select(products: dict[str, Any], name: ImageName, arch: str, kind: Kind) -> StreamImage | None:
    """The newest version of a matching product with the files `kind` needs; None when nothing matches."""
    table = products.get("products")
    if not isinstance(table, dict):
        raise StreamError("a products file of the image server has no 'products' object")
    best: tuple[tuple, str, str, tuple[tuple[StreamFile, ...], str]] | None = None
    for pid, product in table.items():
        if not (_text(pid) and isinstance(product, dict) and _matches(product, name, arch)):
            continue
        versions = product.get("versions")
        if not isinstance(versions, dict):
            continue
        for vname, version in versions.items():
            if not (_text(vname) and isinstance(version, dict) and isinstance(version.get("items"), dict)):
                continue
            picked = _pick(version["items"], kind)
            if picked is None:
                continue
            key = (_version_key(vname), pid)
            if best is None or key > (best[0], best[1]):
                best = (key[0], pid, vname, picked)
    if best is None:
        return None
    _key, pid, vname, (files, fingerprint) = best
    return StreamImage(name, pid, vname, arch, files, fingerprint)


def server_url(server: str, path: str) -> str:
    return f"{server.rstrip('/')}/{path}"


__all__ = [
    "DEFAULT_IMAGE_SERVER",
    "DISK_FTYPES",
    "IMAGE_MAX",
    "INDEX_MAX",
    "INDEX_PATH",
    "PRODUCTS_MAX",
    "ImageName",
    "StreamError",
    "StreamFile",
    "StreamImage",
    "check_server",
    "decode",
    "is_stream_name",
    "parse_image_name",
    "products_paths",
    "select",
    "server_url",
]
