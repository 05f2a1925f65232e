"""Preseed shapes from charm config, and refusal of bad drivers, names, addresses and certificates."""

from __future__ import annotations

import datetime

import pytest

from vmhost.lxd_setup import LxdHostConfig, LxdSetupError, build_preseed, cert_fingerprint


def test_default_preseed_is_a_dir_pool_and_a_managed_bridge():
    assert build_preseed(LxdHostConfig()) == {
        "storage_pools": [{"name": "default", "driver": "dir", "config": {}}],
        "networks": [{"name": "lxdbr0", "type": "bridge", "config": {"ipv4.address": "auto", "ipv6.address": "none"}}],
        "profiles": [
            {
                "name": "default",
                "devices": {
                    "root": {"path": "/", "pool": "default", "type": "disk"},
                    "eth0": {"name": "eth0", "type": "nic", "network": "lxdbr0"},
                },
            }
        ],
    }


def test_existing_bridge_is_used_as_the_nic_parent_and_no_network_is_made():
    p = build_preseed(LxdHostConfig(storage_driver="zfs", bridge="br0", storage_pool="fast"))
    assert "networks" not in p
    assert p["storage_pools"] == [{"name": "fast", "driver": "zfs", "config": {}}]
    assert p["profiles"][0]["devices"]["eth0"] == {"name": "eth0", "type": "nic", "nictype": "bridged", "parent": "br0"}
    assert p["profiles"][0]["devices"]["root"]["pool"] == "fast"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("10.0.0.5", "10.0.0.5:8443"),
        ("10.0.0.5:9443", "10.0.0.5:9443"),
        ("[::]:8443", "[::]:8443"),
        ("::1", "[::1]:8443"),
    ],
)
def test_listen_address_sets_core_https_address(given, expected):
    assert build_preseed(LxdHostConfig(listen_address=given))["config"] == {"core.https_address": expected}


def test_no_trust_password_and_no_clustering_ever():
    p = build_preseed(LxdHostConfig(listen_address="10.0.0.5", storage_driver="lvm"))
    assert "core.trust_password" not in p.get("config", {})
    assert "cluster" not in p


@pytest.mark.parametrize("driver", ["dir", "zfs", "btrfs", "lvm"])
def test_every_supported_driver_is_accepted(driver):
    assert build_preseed(LxdHostConfig(storage_driver=driver))["storage_pools"][0]["driver"] == driver


def test_bad_driver_says_what_is_allowed():
    with pytest.raises(
        LxdSetupError, match=r"lxd-storage-driver 'ceph' is not supported; allowed: dir, zfs, btrfs, lvm"
    ):
        build_preseed(LxdHostConfig(storage_driver="ceph"))


def test_bad_listen_address_and_bridge_name_are_refused():
    with pytest.raises(LxdSetupError, match="not an IP address"):
        build_preseed(LxdHostConfig(listen_address="example.com"))
    with pytest.raises(LxdSetupError, match="port"):
        build_preseed(LxdHostConfig(listen_address="10.0.0.5:99999"))
    with pytest.raises(LxdSetupError, match="bridge name"):
        build_preseed(LxdHostConfig(bridge="br0; rm -rf /"))


def _self_signed_pem() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmhost-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_certificate_fingerprint_is_sha256_of_der():
    import base64
    import hashlib

    pem = _self_signed_pem()
    fp, der_b64 = cert_fingerprint(pem)
    assert fp == hashlib.sha256(base64.b64decode(der_b64)).hexdigest()
    assert len(fp) == 64


@pytest.mark.parametrize(
    "bad",
    ["not a cert", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", "-----BEGIN PRIVATE KEY-----\nx\n"],
)
def test_bad_certificates_are_refused(bad):
    with pytest.raises(LxdSetupError, match="certificate"):
        cert_fingerprint(bad)
