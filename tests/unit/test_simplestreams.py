"""Image names and simplestreams documents (vmhost.simplestreams): the name rule, the server URL, and a
total parser of what an untrusted server sends: hostile, malformed, huge, several versions, other arches."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmhost.simplestreams import (
    INDEX_MAX,
    ImageName,
    StreamError,
    check_server,
    decode,
    is_stream_name,
    parse_image_name,
    products_paths,
    select,
)

SHA = {c: c * 64 for c in "abcdef"}


def _item(ftype: str, sha: str = SHA["a"], size: int = 1000, **extra) -> dict:
    return {"ftype": ftype, "path": f"server/{ftype}", "sha256": sha, "size": size, **extra}


def _product(versions: dict, os="ubuntu", release="noble", version="24.04", arch="amd64", aliases="24.04,noble,lts"):
    return {"os": os, "release": release, "version": version, "arch": arch, "aliases": aliases, "versions": versions}


def _doc(**products) -> dict:
    return {"products": products}


NOBLE = ImageName("ubuntu", "noble")


@pytest.mark.parametrize(
    ("image", "stream"),
    [
        ("ubuntu:24.04", True),
        ("ubuntu:noble", True),
        ("debian:12", True),
        ("jammy", False),  # a file in the libvirt image dir / an LXD alias
        ("/srv/images/a:b.qcow2", False),  # an absolute path, ':' or not
        ("noble.qcow2", False),
    ],
)
def test_a_name_with_a_colon_that_is_not_a_path_is_a_stream_name(image, stream):
    assert is_stream_name(image) is stream


@pytest.mark.parametrize("bad", ["ubuntu:", ":noble", "Ubuntu:noble", "ubuntu:no/ble", "ubuntu:a:b", "u" * 40 + ":x"])
def test_a_malformed_stream_name_is_one_sentence(bad):
    with pytest.raises(StreamError, match=r"is not an image name; use <os>:<alias> such as ubuntu:24\.04"):
        parse_image_name(bad)


def test_name_parts():
    assert parse_image_name("ubuntu:24.04") == ImageName("ubuntu", "24.04")
    assert str(parse_image_name("debian:bookworm")) == "debian:bookworm"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://cloud-images.ubuntu.com/releases", "https://cloud-images.ubuntu.com/releases"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("ftp://mirror/releases", None),
        ("https://user:pw@mirror/releases", None),
        ("https://mirror/releases?x=1", None),
        ("https://mirror/ releases", None),
        ("https://" + "a" * 600, None),
        ("", None),
    ],
)
def test_image_server_is_a_bounded_http_url(url, ok):
    if ok is None:
        with pytest.raises(StreamError, match="is not an http"):
            check_server(url)
    else:
        assert check_server(url) == ok


def test_index_lists_image_downloads_products_files_only():
    index = {
        "index": {
            "b:download": {"datatype": "image-downloads", "format": "products:1.0", "path": "streams/v1/b.json"},
            "a:ids": {"datatype": "image-ids", "path": "streams/v1/ids.json"},
            "c:escape": {"datatype": "image-downloads", "path": "../../etc/passwd"},
            "d:absolute": {"datatype": "image-downloads", "path": "/etc/passwd"},
            "e:url": {"datatype": "image-downloads", "path": "http://elsewhere/x.json"},
            "f:junk": ["not", "an", "object"],
        }
    }
    assert products_paths(index) == ["streams/v1/b.json"]
    with pytest.raises(StreamError, match="lists no image-downloads products file"):
        products_paths({"index": {}})
    with pytest.raises(StreamError, match="has no 'index' object"):
        products_paths({"index": []})


def test_newest_version_with_the_wanted_file_wins():
    doc = _doc(
        p=_product(
            {
                "20240101": {"items": {"d": _item("disk1.img", SHA["a"])}},
                "20240423.1": {"items": {"d": _item("disk1.img", SHA["b"])}},
                "20240423": {"items": {"d": _item("disk1.img", SHA["c"])}},
                "20250101": {"items": {"r": _item("root.tar.xz", SHA["d"])}},  # newest, but no disk
            }
        )
    )
    found = select(doc, NOBLE, "amd64", "disk")
    assert (found.version, found.disk.sha256, found.fingerprint) == ("20240423.1", SHA["b"], SHA["b"])


@pytest.mark.parametrize("alias", ["noble", "24.04", "lts"])
def test_alias_matches_release_version_or_aliases(alias):
    doc = _doc(p=_product({"20240101": {"items": {"d": _item("disk1.img")}}}))
    assert select(doc, ImageName("ubuntu", alias), "amd64", "disk") is not None
    assert select(doc, ImageName("ubuntu", "jammy"), "amd64", "disk") is None
    assert select(doc, ImageName("debian", alias), "amd64", "disk") is None


def test_only_the_host_architecture_is_picked():
    doc = _doc(
        arm=_product({"20250101": {"items": {"d": _item("disk1.img", SHA["a"])}}}, arch="arm64"),
        x86=_product({"20240101": {"items": {"d": _item("disk1.img", SHA["b"])}}}),
    )
    assert select(doc, NOBLE, "amd64", "disk").disk.sha256 == SHA["b"]
    assert select(doc, NOBLE, "arm64", "disk").disk.sha256 == SHA["a"]
    assert select(doc, NOBLE, "s390x", "disk") is None


def test_disk1_is_preferred_to_disk_kvm_for_libvirt():
    items = {"k": _item("disk-kvm.img", SHA["a"]), "d": _item("disk1.img", SHA["b"])}
    assert select(_doc(p=_product({"20240101": {"items": items}})), NOBLE, "amd64", "disk").disk.ftype == "disk1.img"
    only_kvm = {"k": _item("disk-kvm.img", SHA["a"])}
    assert select(_doc(p=_product({"1": {"items": only_kvm}})), NOBLE, "amd64", "disk").disk.ftype == "disk-kvm.img"


def test_lxd_needs_metadata_and_a_disk_and_is_named_by_the_combined_sha256():
    meta = _item("lxd.tar.xz", SHA["c"], **{"combined_disk-kvm-img_sha256": SHA["d"]})
    items = {"m": meta, "k": _item("disk-kvm.img", SHA["a"])}
    found = select(_doc(p=_product({"20240101": {"items": items}})), NOBLE, "amd64", "lxd")
    assert [f.ftype for f in found.files] == ["lxd.tar.xz", "disk-kvm.img"]
    assert found.fingerprint == SHA["d"]
    # A disk without the metadata, or metadata without the combined hash, is no LXD VM image.
    assert select(_doc(p=_product({"1": {"items": {"k": _item("disk-kvm.img")}}})), NOBLE, "amd64", "lxd") is None
    no_combined = {"m": _item("lxd.tar.xz"), "k": _item("disk-kvm.img")}
    assert select(_doc(p=_product({"1": {"items": no_combined}})), NOBLE, "amd64", "lxd") is None


@pytest.mark.parametrize(
    "item",
    [
        _item("disk1.img", sha="not-a-sha"),
        _item("disk1.img", size=0),
        _item("disk1.img", size=True),
        _item("disk1.img", size="1000"),
        _item("disk1.img", size=10**20),
        {**_item("disk1.img"), "path": "../../../etc/shadow"},
        {**_item("disk1.img"), "path": "/etc/shadow"},
        {**_item("disk1.img"), "path": "https://elsewhere/x.img"},
        {**_item("disk1.img"), "path": "a\nb"},
        {"ftype": "disk1.img"},
        "a string",
        None,
    ],
)
def test_an_unusable_item_is_skipped(item):
    assert select(_doc(p=_product({"20240101": {"items": {"d": item}}})), NOBLE, "amd64", "disk") is None


@pytest.mark.parametrize(
    "products",
    [
        {"p": None},
        {"p": []},
        {"p": {"os": "ubuntu"}},
        {"p": _product({"20240101": None})},
        {"p": _product({"20240101": {"items": []}})},
        {"p": _product([])},
        {"p": {**_product({}), "aliases": ["noble"]}},
        {"p": {**_product({}), "os": 7}},
        {"x" * 1000: _product({"20240101": {"items": {"d": _item("disk1.img")}}})},
    ],
)
def test_missing_or_mistyped_fields_match_nothing(products):
    assert select({"products": products}, NOBLE, "amd64", "disk") is None


def test_a_document_without_products_is_one_sentence():
    with pytest.raises(StreamError, match="has no 'products' object"):
        select({"products": []}, NOBLE, "amd64", "disk")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"x" * (INDEX_MAX + 1), "is larger than 4 MiB"),
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "is not valid JSON"),  # too deep for the decoder
        (b"[]", "is not a JSON object"),
        (b'"text"', "is not a JSON object"),
    ],
)
def test_decode_is_total_and_bounded(data, why):
    with pytest.raises(StreamError, match=why):
        decode(data, "index.json", INDEX_MAX)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=8), c),
        max_leaves=30,
    )
)
def test_any_json_is_answered_without_a_crash(value):
    data = json.dumps(value).encode()
    try:
        doc = decode(data, "doc", INDEX_MAX)
    except StreamError:
        return
    for call in (lambda: products_paths(doc), lambda: select(doc, NOBLE, "amd64", "disk")):
        with contextlib.suppress(StreamError):
            call()
