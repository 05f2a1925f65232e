"""Preseed shapes from charm config (only what the daemon lacks), and refusal of bad drivers, names, addresses, certs."""

from __future__ import annotations

import base64
import json

import pytest

from tests.unit.fakes import FakeLxdTrust, self_signed_pem
from vmhost import lxd_setup
from vmhost.lxd_setup import (
    TOKEN_EXPIRY_MAX,
    LxdHostConfig,
    LxdHostState,
    LxdSetupError,
    build_preseed,
    cert_fingerprint,
)


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


# --- only what is missing: LXD merges a preseed into objects that exist ------------------------------

SET_UP = LxdHostState(
    pools={"default": "dir"},
    networks=frozenset({"lxdbr0"}),
    profile_devices={
        "root": {"path": "/", "pool": "default", "type": "disk"},
        "eth0": {"name": "eth0", "type": "nic", "network": "lxdbr0"},
    },
    https_address="10.0.0.5:8443",
)


def test_a_set_up_host_gets_an_empty_preseed():
    assert build_preseed(LxdHostConfig(listen_address="10.0.0.5"), SET_UP) == {}


def test_existing_pool_is_not_in_the_preseed_even_with_another_driver():
    p = build_preseed(LxdHostConfig(storage_driver="zfs"), LxdHostState(pools={"default": "dir"}))
    assert "storage_pools" not in p
    assert p["networks"][0]["name"] == "lxdbr0"  # what is missing still is


def test_existing_network_is_not_in_the_preseed_so_its_subnet_is_kept():
    p = build_preseed(LxdHostConfig(), LxdHostState(networks=frozenset({"lxdbr0"})))
    assert "networks" not in p
    assert p["storage_pools"] == [{"name": "default", "driver": "dir", "config": {}}]


def test_an_unmanaged_interface_of_that_name_does_not_count_as_the_network():
    # read_state lists managed networks only; a missing managed lxdbr0 is created (LXD refuses a clash itself).
    assert build_preseed(LxdHostConfig(), LxdHostState(networks=frozenset({"eth0"})))["networks"][0]["name"] == "lxdbr0"


def test_profile_devices_are_added_only_when_absent_whatever_the_operator_named_them():
    renamed = LxdHostState(
        pools={"default": "dir"},
        networks=frozenset({"lxdbr0"}),
        profile_devices={"disk0": {"type": "disk", "path": "/", "pool": "default"}, "net0": {"type": "nic"}},
    )
    assert build_preseed(LxdHostConfig(), renamed) == {}
    no_nic = LxdHostState(
        pools={"default": "dir"},
        networks=frozenset({"lxdbr0"}),
        profile_devices={"root": SET_UP.profile_devices["root"]},
    )
    assert build_preseed(LxdHostConfig(), no_nic) == {
        "profiles": [{"name": "default", "devices": {"eth0": {"name": "eth0", "type": "nic", "network": "lxdbr0"}}}]
    }


def test_listen_address_is_applied_only_when_it_differs():
    assert build_preseed(LxdHostConfig(listen_address="10.0.0.5:8443"), SET_UP) == {}
    assert build_preseed(LxdHostConfig(listen_address="10.0.0.6"), SET_UP) == {
        "config": {"core.https_address": "10.0.0.6:8443"}
    }
    assert build_preseed(LxdHostConfig(), SET_UP) == {}  # unset: the daemon's own address is left alone


@pytest.fixture
def daemon(monkeypatch):
    """read_state/apply_preseed of a daemon that has SET_UP; `applied` records what ensure_host sent."""
    applied: list[dict] = []
    monkeypatch.setattr(lxd_setup, "read_state", lambda client=None, timeout=None: SET_UP)
    monkeypatch.setattr(lxd_setup, "apply_preseed", applied.append)
    return applied


def test_ensure_host_on_a_set_up_host_applies_nothing(daemon):
    report = lxd_setup.ensure_host(LxdHostConfig(listen_address="10.0.0.5"))
    assert report.applied == {} and report.notes == ()
    assert daemon == []


def test_ensure_host_keeps_a_pool_of_another_driver_and_says_so_in_one_sentence(daemon):
    report = lxd_setup.ensure_host(LxdHostConfig(storage_driver="zfs"))
    assert daemon == []
    assert report.notes == (
        "storage pool default exists with driver dir; lxd-storage-driver=zfs only applies at first set-up",
    )


def test_ensure_host_refuses_bad_config_before_reading_the_daemon(monkeypatch):
    def unreachable(client=None):
        raise AssertionError("read the daemon for a config it must refuse")

    monkeypatch.setattr(lxd_setup, "read_state", unreachable)
    with pytest.raises(LxdSetupError, match="lxd-storage-driver 'ceph'"):
        lxd_setup.ensure_host(LxdHostConfig(storage_driver="ceph"))


def test_certificate_fingerprint_is_sha256_of_der():
    import base64
    import hashlib

    pem = self_signed_pem()
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


# --- trust: restricted certificates, expiring tokens --------------------------------------------------


def test_client_certificate_restricted_to_projects_or_full_access_only_when_asked():
    lxd = FakeLxdTrust()
    pem, admin_pem = self_signed_pem(), self_signed_pem("admin")
    fp = lxd_setup.add_trusted_client(pem, "maas", projects=("vmhost",), client=lxd)
    assert lxd.certs[fp] == {"name": "maas", "fingerprint": fp, "restricted": True, "projects": ["vmhost"]}
    admin_fp = lxd_setup.add_trusted_client(admin_pem, "ops", projects=None, client=lxd)
    assert lxd.certs[admin_fp]["restricted"] is False
    assert lxd_setup.describe_access(("vmhost",)) == "access to project vmhost only"
    assert lxd_setup.describe_access(None) == "full access"


def test_same_certificate_same_name_and_access_is_idempotent():
    lxd = FakeLxdTrust()
    pem = self_signed_pem()
    fp = lxd_setup.add_trusted_client(pem, "maas", projects=("vmhost",), client=lxd)
    assert lxd_setup.add_trusted_client(pem, "maas", projects=("vmhost",), client=lxd) == fp
    assert len(lxd.certs) == 1


@pytest.mark.parametrize(
    ("name", "projects", "says"),
    [
        ("other", ("vmhost",), "as 'other' with access to project vmhost only"),
        ("maas", None, "as 'maas' with full access"),
    ],
)
def test_same_certificate_under_another_name_or_access_is_reported_not_changed(name, projects, says):
    lxd = FakeLxdTrust()
    pem = self_signed_pem()
    fp = lxd_setup.add_trusted_client(pem, "maas", projects=("vmhost",), client=lxd)
    with pytest.raises(LxdSetupError) as e:
        lxd_setup.add_trusted_client(pem, name, projects=projects, client=lxd)
    assert str(e.value) == (
        f"this certificate ({fp[:12]}) is already trusted as 'maas' with access to project vmhost only; "
        f"nothing changed: to trust it {says}, remove it first (lxc config trust remove {fp[:12]})"
    )
    assert lxd.certs[fp]["name"] == "maas" and lxd.certs[fp]["restricted"] is True


def test_join_token_expires_and_the_server_setting_is_put_back():
    lxd = FakeLxdTrust()
    lxd.config["core.remote_token_expiry"] = "2d"  # the operator's own setting for `lxc config trust add`
    token = lxd_setup.create_join_token("laptop", expiry_s=1800, projects=("vmhost",), client=lxd)
    made = lxd.tokens[0]
    assert made["expiresAt"] == token.expires_at == "2027-01-15T08:30:00Z"  # 30 min after lxd.now
    assert made["request"] == {
        "type": "client",
        "name": "laptop",
        "token": True,
        "restricted": True,
        "projects": ["vmhost"],
    }
    assert lxd.config == {"core.remote_token_expiry": "2d"}
    decoded = json.loads(base64.b64decode(token.token))
    assert decoded == {
        "client_name": "laptop",
        "fingerprint": "5e7ver",
        "addresses": ["10.0.0.5:8443"],
        "secret": "5ecret",
        "expires_at": "2027-01-15T08:30:00Z",
    }


def test_unset_expiry_setting_is_unset_again():
    lxd = FakeLxdTrust()
    lxd_setup.create_join_token("laptop", expiry_s=60, client=lxd)
    assert lxd.config == {}
    assert lxd.tokens[0]["request"]["restricted"] is False


def test_lxd_without_token_expiry_issues_no_token():
    lxd = FakeLxdTrust(extensions=("certificate_token",))
    with pytest.raises(LxdSetupError, match=r"cannot make join tokens expire .*no token issued"):
        lxd_setup.create_join_token("laptop", client=lxd)
    assert lxd.tokens == []


@pytest.mark.parametrize("expiry", [0, TOKEN_EXPIRY_MAX + 1, "1h"])
def test_token_expiry_is_bounded(expiry):
    with pytest.raises(LxdSetupError, match="token expiry"):
        lxd_setup.create_join_token("laptop", expiry_s=expiry, client=FakeLxdTrust())


def test_a_token_lxd_made_without_expiry_is_revoked_not_handed_out(monkeypatch):
    lxd = FakeLxdTrust()
    real_patch = type(lxd.api).patch
    monkeypatch.setattr(type(lxd.api), "patch", lambda self, json: real_patch(self, {"config": {}}))  # setting ignored
    with pytest.raises(LxdSetupError, match="did not return an expiring join token"):
        lxd_setup.create_join_token("laptop", client=lxd)
    assert lxd.cancelled == ["op-1"]
