"""vm-host's SSH host keys for a VM: real ssh-keygen pairs, read back exactly, temp files gone, private halves unprinted."""

from __future__ import annotations

import subprocess

import pytest

from vmhost import hostkeys
from vmhost.hostkeys import generate_host_keys, known_hosts_lines


def test_pairs_are_real_and_fingerprints_match_ssh_keygen(tmp_path):
    pairs = generate_host_keys(str(tmp_path))
    assert [p.public.algorithm for p in pairs] == ["ssh-ed25519"]
    pair = pairs[0]
    assert pair.private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pair.public.public_key.startswith("ssh-ed25519 ") and len(pair.public.public_key.split()) == 2
    # The private half derives the public one, and ssh-keygen fingerprints it as reported.
    key = tmp_path / "k"
    key.write_text(pair.private)
    key.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True).stdout
    assert derived.split()[:2] == pair.public.public_key.split()
    fp = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], capture_output=True, text=True, check=True).stdout
    assert fp.split()[1] == pair.public.fingerprint
    key.unlink()
    assert list(tmp_path.iterdir()) == []  # the generator's own 0700 directory is gone
    assert generate_host_keys()[0].public != pair.public  # fresh every time


def test_private_half_is_not_in_repr():
    pair = generate_host_keys()[0]
    assert "PRIVATE" not in repr(pair) and pair.private[40:80] not in repr(pair)


def test_temp_dir_is_removed_when_keygen_fails(tmp_path, monkeypatch):
    real = hostkeys._keygen
    seen = []

    def failing(args):
        if "-l" in args:  # the pair is on disk by now
            seen.extend(p.name for p in tmp_path.rglob("*"))
            raise RuntimeError("ssh-keygen failed: boom")
        return real(args)

    monkeypatch.setattr(hostkeys, "_keygen", failing)
    with pytest.raises(RuntimeError, match="boom") as err:
        generate_host_keys(str(tmp_path))
    assert any(name.endswith("_key") for name in seen)  # the failure happened with a private key on disk
    assert list(tmp_path.iterdir()) == []
    assert "PRIVATE" not in str(err.value)


def test_known_hosts_pins_the_reported_keys():
    pair = generate_host_keys()[0]
    assert known_hosts_lines(["10.0.0.5"], (pair.public,)) == f"10.0.0.5 {pair.public.public_key}\n"
