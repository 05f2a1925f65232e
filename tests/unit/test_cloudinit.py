"""The NoCloud seed documents and ISO (provider-neutral; libvirt and LXD share them)."""

from __future__ import annotations

import email
import shutil
import subprocess
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
import yaml

from vmhost.cloudinit import check_ssh_keys, seed_documents, user_data, write_seed_iso
from vmhost.hostkeys import generate_host_keys
from vmhost.model import DEFAULT_LOGIN_USER, CloudInit, NicAllocation

NICS = (
    NicAllocation("eth0", "bridge", "br0", ip="10.20.0.50", mac="52:54:00:00:00:01"),
    NicAllocation("eth1", "macvlan", "eno1", mac="52:54:00:00:00:02"),
)


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGXuzinACkSeBrlWwMqzXdLesbcyptFCAOXux58IMPQz alice@laptop"


def test_documents_carry_hostname_keys_and_static_address():
    docs = seed_documents(CloudInit("vm-1", (KEY,)), NICS, instance_id="i-1", prefixes={"eth0": 23})
    assert set(docs) == {"user-data", "meta-data", "network-config"}
    assert docs["user-data"].startswith("#cloud-config\n")
    assert f"- {KEY}\n" in docs["user-data"]  # one line, as given
    user = yaml.safe_load(docs["user-data"])
    assert user["hostname"] == "vm-1"
    assert user["users"] == [
        {
            "name": DEFAULT_LOGIN_USER,
            "groups": ["sudo"],
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "shell": "/bin/bash",
            "lock_passwd": True,
            "ssh_authorized_keys": [KEY],
        }
    ]
    # The keys go to the one login user only: meta-data's public-keys would also reach the image's own user.
    meta = yaml.safe_load(docs["meta-data"])
    assert meta == {"instance-id": "i-1", "local-hostname": "vm-1"}
    net = yaml.safe_load(docs["network-config"])
    assert net["version"] == 2
    assert net["ethernets"]["eth0"] == {
        "set-name": "eth0",
        "match": {"macaddress": "52:54:00:00:00:01"},
        "addresses": ["10.20.0.50/23"],
    }
    assert net["ethernets"]["eth1"]["dhcp4"] is True and "addresses" not in net["ethernets"]["eth1"]


def test_login_user_is_made_without_keys_too():
    user = yaml.safe_load(seed_documents(CloudInit("vm-1"))["user-data"])
    assert [u["name"] for u in user["users"]] == [DEFAULT_LOGIN_USER] and user["users"][0]["ssh_authorized_keys"] == []


def test_host_keys_go_in_ssh_keys_and_the_guest_makes_none():
    pairs = generate_host_keys()
    user = yaml.safe_load(seed_documents(CloudInit("vm-1", (KEY,)), host_keys=pairs)["user-data"])
    assert user["ssh_keys"]["ed25519_private"] == pairs[0].private
    assert user["ssh_keys"]["ed25519_public"] == pairs[0].public.public_key
    # Only the types given, so cloud-init makes none (each exists) and its schema is satisfied (not empty).
    assert user["ssh_genkeytypes"] == ["ed25519"] and user["ssh_deletekeys"] is True
    assert user["manage_etc_hosts"] is True and user["ssh_pwauth"] is False


def test_callers_cloud_config_is_merged_vm_host_wins_on_its_own_keys():
    theirs = (
        "#cloud-config\npackages: [htop]\nhostname: other\n"
        "users: [default, {name: ops}, {name: ubuntu, shell: /bin/zsh}]\n"
        "ssh_keys: {rsa_private: mine}\nssh_pwauth: true\n"
    )
    pairs = generate_host_keys()
    user = yaml.safe_load(seed_documents(CloudInit("vm-2", (KEY,), user_data=theirs), host_keys=pairs)["user-data"])
    assert user["packages"] == ["htop"] and user["ssh_pwauth"] is True  # theirs kept, a vm-host default changed
    assert user["hostname"] == "vm-2"  # ours wins
    assert user["ssh_keys"] == {"ed25519_private": pairs[0].private, "ed25519_public": pairs[0].public.public_key}
    names = [u if isinstance(u, str) else u["name"] for u in user["users"]]
    assert names == ["default", "ops", DEFAULT_LOGIN_USER]
    assert user["users"][-1]["shell"] == "/bin/bash" and user["users"][-1]["ssh_authorized_keys"] == [KEY]


def test_a_script_travels_beside_vm_host_part_in_a_mime_multipart():
    script = "#!/bin/sh\necho hi\n"
    docs = seed_documents(CloudInit("vm-2", (KEY,), user_data=script))
    msg = email.message_from_string(docs["user-data"])
    assert msg.is_multipart()
    parts = [(p.get_content_type(), p.get_payload(decode=True).decode()) for p in msg.get_payload()]
    assert parts[0] == ("text/x-shellscript", script)
    assert parts[1][0] == "text/cloud-config"
    assert yaml.safe_load(parts[1][1])["users"][0]["ssh_authorized_keys"] == [KEY]


def test_a_callers_mime_archive_keeps_its_parts_and_gains_ours():
    given = MIMEMultipart()
    given.attach(MIMEText("#!/bin/sh\ntrue\n", "x-shellscript"))
    given.attach(MIMEText("#cloud-config\npackages: [jq]\n", "cloud-config"))
    msg = email.message_from_string(seed_documents(CloudInit("vm-3", user_data=given.as_string()))["user-data"])
    types = [p.get_content_type() for p in msg.get_payload()]
    assert types == ["text/x-shellscript", "text/cloud-config", "text/cloud-config"]
    assert "hostname: vm-3" in msg.get_payload()[2].get_payload(decode=True).decode()


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (["ssh-ed25519"], "is not one OpenSSH public key line"),
        (
            ["ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ"],
            "is not one OpenSSH public key line",
        ),  # an RSA blob under the ed25519 type
        (["ssh-dss AAAAB3NzaC1kc3M="], "is not one OpenSSH public key line"),
        (['from="x" ' + KEY], "is not one OpenSSH public key line"),
        ([KEY + "\u00e9\x07"], "comment"),
        ([KEY] * 33, "at most 32"),
        (["ssh-rsa " + "A" * 17000], "at most 8192 characters"),
        ([""], "is not one OpenSSH public key line"),
        ("ssh-ed25519 AAAA", "list"),
    ],
)
def test_bad_ssh_keys_are_refused_in_one_sentence(keys, says):
    with pytest.raises(ValueError, match=says):
        check_ssh_keys(keys)


def test_good_ssh_keys_pass_with_their_comment():
    assert check_ssh_keys([KEY + "  ", "  " + KEY.rsplit(" ", 1)[0]]) == (KEY, KEY.rsplit(" ", 1)[0])


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "user_data must be text"),
        ("#!/bin/sh\n" + "x" * 65536, "at most 65536 are allowed"),
        ("echo hi\n", "cloud-init would ignore it"),
        ("#cloud-config\n- a list\n", "must be a mapping"),
        ("#cloud-config\nkey: [unclosed\n", "not valid YAML at line"),
        ("#cloud-config\nusers: ubuntu\n", "must be a list"),
        (b"#!/bin/sh", "must be text"),
    ],
)
def test_bad_user_data_is_refused_in_one_sentence(text, says):
    with pytest.raises(ValueError, match=says):
        user_data(CloudInit("vm", user_data=text))


def _nested(depth: int) -> str:
    return "#cloud-config\nwrite_files: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("#cloud-config\n" + "[" * 20000, "is nested more than 32 levels deep"),  # deeper than PyYAML recurses
        ("#cloud-config\n" + "{a: " * 15000, "is nested more than 32 levels deep"),
        (_nested(400), "is nested more than 32 levels deep"),  # parses, but deeper than merging and dumping go
        (_nested(33), "is nested more than 32 levels deep"),
        ("#cloud-config\na: &x [*x]\n", "is nested more than 32 levels deep"),  # refers to itself
        (  # an alias bomb: 10**6 values from 200 bytes
            "#cloud-config\n"
            + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7)).replace("*l0", "x"),
            "holds more than 100000 values",
        ),
    ],
    ids=["unparsed-depth", "unparsed-mapping", "parsed-depth", "one-too-deep", "cycle", "alias-bomb"],
)
def test_a_cloud_config_too_deep_or_too_big_is_one_sentence(text, says):
    with pytest.raises(ValueError, match=f"^user_data's #cloud-config {says}"):
        user_data(CloudInit("vm", user_data=text))


def test_a_cloud_config_at_the_depth_limit_is_merged():
    assert "write_files:" in user_data(CloudInit("vm", user_data=_nested(32)))


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


def test_a_seed_tool_that_hangs_costs_a_bounded_wait(tmp_path, monkeypatch):
    import time

    from vmhost import cloudinit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "genisoimage").write_text("#!/bin/sh\nexec sleep 60\n")
    (bin_dir / "genisoimage").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(cloudinit, "SEED_TIMEOUT", 0.5)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^genisoimage did not finish within 0\.5 s$"):
        write_seed_iso(seed_documents(CloudInit("vm-3")), tmp_path / "seed.iso")
    assert time.monotonic() - t0 < 5


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


def test_user_data_never_shows_in_a_repr():
    """A plan or request printed in a log or a traceback must not carry the caller's user-data (it may hold
    secrets); keys are public and may show."""
    from vmhost.model import CloudInit, ComposePlan

    seed = CloudInit("vm-1", ("ssh-ed25519 AAAA k",), user_data="#cloud-config\npassword: hunter2\n")
    assert "hunter2" not in repr(seed) and "vm-1" in repr(seed)
    assert "hunter2" not in repr(ComposePlan(allocation=None, cloud_init=seed))  # type: ignore[arg-type]
