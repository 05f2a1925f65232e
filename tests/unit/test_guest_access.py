"""vmhost.guest_access: SSH public key lines checked to their wire format, fingerprints as ssh-keygen prints them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.unit.ssh_keys import DSA, ECDSA, ED25519, RSA, RSA_1024, SK_ED25519
from vmhost.guest_access import check_public_key, check_user_data, key_fingerprint
from vmhost.parse import ParseError


@pytest.mark.parametrize("key", [ED25519, ECDSA, RSA, SK_ED25519], ids=["ed25519", "ecdsa", "rsa", "sk-ed25519"])
def test_fingerprints_are_what_ssh_keygen_prints(key, tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen on PATH to compare fingerprints with")
    path = tmp_path / "key.pub"
    path.write_text(key + "\n")
    printed = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.split()[1] == key_fingerprint(check_public_key(key))


@pytest.mark.parametrize("key", [DSA, RSA_1024], ids=["dsa", "rsa-1024"])
def test_weak_keys_are_refused(key):
    with pytest.raises(ParseError, match="allowed types"):
        check_public_key(key)


def test_user_data_is_bounded_in_bytes_not_characters():
    assert check_user_data("é" * 32 * 1024) is not None  # 64 KiB of UTF-8 exactly
    with pytest.raises(ParseError, match="65538 bytes"):
        check_user_data("é" * (32 * 1024 + 1))
