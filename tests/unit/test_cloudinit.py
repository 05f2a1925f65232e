"""The NoCloud seed documents and ISO (provider-neutral; libvirt and LXD share them)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from vmhost.cloudinit import seed_documents, write_seed_iso
from vmhost.model import CloudInit, NicAllocation

NICS = (
    NicAllocation("eth0", "bridge", "br0", ip="10.20.0.50", mac="52:54:00:00:00:01"),
    NicAllocation("eth1", "macvlan", "eno1", mac="52:54:00:00:00:02"),
)


def test_documents_carry_hostname_keys_and_static_address():
    docs = seed_documents(CloudInit("vm-1", ("ssh-ed25519 AAAA k",)), NICS, instance_id="i-1", prefixes={"eth0": 23})
    assert set(docs) == {"user-data", "meta-data", "network-config"}
    assert docs["user-data"].startswith("#cloud-config\n")
    user = yaml.safe_load(docs["user-data"])
    assert user["hostname"] == "vm-1" and user["ssh_authorized_keys"] == ["ssh-ed25519 AAAA k"]
    meta = yaml.safe_load(docs["meta-data"])
    assert meta == {"instance-id": "i-1", "local-hostname": "vm-1", "public-keys": ["ssh-ed25519 AAAA k"]}
    net = yaml.safe_load(docs["network-config"])
    assert net["version"] == 2
    assert net["ethernets"]["eth0"] == {
        "set-name": "eth0",
        "match": {"macaddress": "52:54:00:00:00:01"},
        "addresses": ["10.20.0.50/23"],
    }
    assert net["ethernets"]["eth1"]["dhcp4"] is True and "addresses" not in net["ethernets"]["eth1"]


def test_callers_user_data_passes_through_untouched():
    script = "#!/bin/sh\necho hi\n"
    docs = seed_documents(CloudInit("vm-2", ("k",), user_data=script))
    assert docs["user-data"] == script
    assert yaml.safe_load(docs["meta-data"])["public-keys"] == ["k"]


def test_unknown_prefix_falls_back_to_the_lan_default():
    docs = seed_documents(CloudInit("h"), (NicAllocation("e", "bridge", "b", ip="fd00::5", mac="52:54:00:00:00:09"),))
    assert yaml.safe_load(docs["network-config"])["ethernets"]["e"]["addresses"] == ["fd00::5/64"]


@pytest.mark.skipif(
    not (shutil.which("genisoimage") and shutil.which("isoinfo")), reason="genisoimage is not installed"
)
def test_iso_is_a_cidata_volume_with_the_three_files(tmp_path):
    docs = seed_documents(CloudInit("vm-3"), NICS)
    iso = write_seed_iso(docs, tmp_path / "seed.iso")
    pvd = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in pvd
    for name, text in docs.items():
        got = subprocess.run(["isoinfo", "-J", "-i", str(iso), "-x", f"/{name}"], capture_output=True, text=True)
        assert got.stdout == text


def test_static_prefixes_come_from_the_first_host_address_containing_the_ip():
    from vmhost.cloudinit import static_prefixes
    from vmhost.model import NicAllocation

    nics = [
        NicAllocation("eth0", "bridge", "br0", ip="10.20.0.7"),
        NicAllocation("eth1", "bridge", "br1", ip="10.30.0.7/28"),  # carries its own prefix
        NicAllocation("eth2", "bridge", "br2", ip="2001:db8::7"),
        NicAllocation("eth3", "bridge", "br0"),  # DHCP
    ]
    host = {
        "br0": ["fe80::1/64", "10.20.0.1/23", "10.20.0.1/24"],
        "br1": ["10.30.0.1/24"],
        "br2": ["10.0.0.1/8", "2001:db8::1/48"],
    }
    assert static_prefixes(nics, host) == {"eth0": 23, "eth2": 48}
