"""Compose takes SSH keys and user-data (CLI, action, relation alike): validated before anything is made,
into the seed of the one login user; the VM's host keys are reported, their private halves never printed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from tests.unit.fakes import FakeProvider
from vmhost import cli
from vmhost.access import cloud_init_for, ssh_key_lines
from vmhost.cloudinit import MAX_SSH_KEYS, seed_documents
from vmhost.model import DEFAULT_LOGIN_USER

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGXuzinACkSeBrlWwMqzXdLesbcyptFCAOXux58IMPQz alice@laptop"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCy+PObycCnqwUcbahrJyFhhCUKFX/MUzoCDnadPtXYmMigqahxMHsgsGXQ6Su3lmWyvPU7TZEN4IlSzekSmSMdotV2gyq9vyQtXgqZyvhi69xQ+fjDXf30BlNhZZkkYbbW+bSCgT06fA3euWjaO6opyNIwsKvxekVKSSH+h5qY7EL6Dw+DUhFb7R5yg5354Ik5ZiPlXNeK1y3rb6Zgehdaw895dOURgUmike/E1zVa5ERtfrjxy6nMXniro46Eq7n+ddeTIzfVCTvdriMAeDqzQaRy4R7YVd0+5LjHsiXtaFyRj5tnEv1VFDdYigl8j3hDTYsXufhycPpgqhIgn28l bob"  # a real 2048-bit key: smaller RSA is refused


@pytest.fixture
def fake(monkeypatch, tmp_path):
    provider = FakeProvider()
    monkeypatch.setattr(cli, "make_provider", lambda settings: provider)
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "lock"))
    return provider


def test_cli_compose_passes_keys_from_args_and_files_and_user_data(fake, tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\n\n{KEY}\n")
    ud = tmp_path / "ud"
    ud.write_text("#cloud-config\npackages: [htop]\n")
    code = cli.main(
        ["compose", "--hostname", "web-1", "--boot", "image", "--image", "/srv/x.qcow2", "--storage", "root:4",
         "--ssh-key", f"@{keys}", "--ssh-key", KEY.rsplit(" ", 1)[0], "--user-data", f"@{ud}"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    ci = fake.composed[-1].cloud_init
    assert ci.hostname == "web-1" and ci.ssh_authorized_keys == (KEY, KEY.rsplit(" ", 1)[0])
    assert ci.user_data == "#cloud-config\npackages: [htop]\n"


def test_cli_keys_without_a_hostname_get_the_vms_generated_name(fake, capsys):
    assert cli.main(["compose", "--ssh-key", KEY, "--json"]) == 0
    vm = json.loads(capsys.readouterr().out)
    assert fake.composed[-1].cloud_init.hostname == vm["name"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ssh-key", "ssh-ed25519 AAAA"], "entry 0 is not one OpenSSH public key line"),
        (["--ssh-key", "@/nonexistent/keys"], "SSH key file '/nonexistent/keys' cannot be read"),
        (["--user-data", "echo hi"], "cloud-init would ignore it"),
        (["--user-data", "#cloud-config\n[1"], "not valid YAML"),
        (["--ssh-key", KEY] * (MAX_SSH_KEYS + 1), f"at most {MAX_SSH_KEYS}"),
    ],
)
def test_cli_bad_access_is_one_sentence_and_nothing_is_made(fake, capsys, args, says):
    assert cli.main(["compose", *args]) == 1
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert fake.composed == [] and fake.vms == {}


def test_user_data_file_over_the_ceiling_is_refused(fake, tmp_path, capsys):
    big = tmp_path / "big"
    big.write_text("#!/bin/sh\n" + "#" * 70000)
    assert cli.main(["compose", "--user-data", f"@{big}"]) == 1
    assert "larger than 65536 bytes" in capsys.readouterr().err and fake.composed == []


def test_nothing_given_means_the_default_seed():
    assert cloud_init_for("vm", (), None) is None
    assert cloud_init_for(None, [RSA], None).ssh_authorized_keys == (RSA,)


def test_key_files_skip_comments_and_blank_lines(tmp_path):
    f = tmp_path / "k"
    f.write_text(f"\n# a\n  {KEY}  \n{RSA}\n")
    assert ssh_key_lines([f"@{f}"]) == (KEY, RSA)


def test_list_shows_how_to_reach_a_vm(fake, capsys):
    assert cli.main(["compose", "--hostname", "web-2", "--ssh-key", KEY]) == 0
    fake.vms["web-2"] = replace(fake.vms["web-2"], addresses=("10.1.2.3",), login_user=DEFAULT_LOGIN_USER)
    capsys.readouterr()
    assert cli.main(["list"]) == 0
    assert f"ssh {DEFAULT_LOGIN_USER}@10.1.2.3" in capsys.readouterr().out
    assert cli.main(["list", "--json"]) == 0
    (vm,) = json.loads(capsys.readouterr().out)
    assert (vm["addresses"], vm["login_user"], vm["host_keys"]) == (["10.1.2.3"], DEFAULT_LOGIN_USER, [])


def test_domain_type_reaches_the_libvirt_provider_settings(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(cli, "make_provider", lambda settings: seen.append(settings) or FakeProvider())
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "lock"))
    assert cli.main(["list", "--domain-type", "qemu"]) == 0
    assert seen[-1].options == {"domain_type": "qemu"}
    with pytest.raises(SystemExit):
        cli.main(["list", "--domain-type", "xen"])
    assert "invalid choice: 'xen'" in capsys.readouterr().err


def test_seed_from_the_cli_has_the_login_user_and_keys(fake):
    assert cli.main(["compose", "--hostname", "web-3", "--ssh-key", KEY]) == 0
    user = yaml.safe_load(seed_documents(fake.composed[-1].cloud_init)["user-data"])
    assert user["users"][0]["name"] == DEFAULT_LOGIN_USER and user["users"][0]["ssh_authorized_keys"] == [KEY]
