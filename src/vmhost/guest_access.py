"""How a guest is reached, checked: SSH public key lines, their fingerprints, and user-data as opaque text.

Total and pure, with no project imports but ParseError: the relation policy judges remote requests with
these, and the same checks serve any other caller that hands keys or user-data to a seed. A key line is
checked down to its wire format (the type inside the base64 blob must be the type the line names, the
blob must hold exactly that type's fields), so nothing else (an authorized_keys option, a private key,
a second line) can ride along. Messages name the entry and what is allowed, never the value: user-data
may hold secrets, and a remote model's text is never echoed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from vmhost.parse import ParseError

__all__ = [
    "KEY_TYPES",
    "MAX_AUTHORIZED_KEYS",
    "MAX_KEY_LINE",
    "MAX_USER_DATA",
    "check_authorized_keys",
    "check_public_key",
    "check_user_data",
    "key_fingerprint",
]

# Types OpenSSH accepts by default today (no DSA: OpenSSH 9.8 removed it).
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
MAX_AUTHORIZED_KEYS = 32
MAX_KEY_LINE = 8192  # an RSA key of 16384 bits is about 2800 characters
MAX_USER_DATA = 64 * 1024  # bytes of UTF-8, as cloud-init's NoCloud seed on a small ISO takes it easily
MIN_RSA_BITS = 2048
_COMMENT_RE = re.compile(r"^[\x20-\x7e]{0,512}$")
_ALLOWED = ", ".join(KEY_TYPES)


def _fields(blob: bytes) -> list[bytes]:
    """The SSH wire strings (uint32 length, bytes) a key blob is made of; ValueError unless it is exactly those."""
    out = []
    at = 0
    while at < len(blob):
        if at + 4 > len(blob) or len(out) >= 8:
            raise ValueError
        size = int.from_bytes(blob[at : at + 4], "big")
        at += 4
        if at + size > len(blob):
            raise ValueError
        out.append(blob[at : at + size])
        at += size
    return out


def _blob_ok(kind: str, fields: list[bytes]) -> bool:
    """Whether the blob's fields are those of a `kind` public key (and an RSA modulus is big enough)."""
    if not fields or fields[0] != kind.encode():
        return False
    if kind == "ssh-ed25519":
        return len(fields) == 2 and len(fields[1]) == 32
    if kind == "ssh-rsa":
        return len(fields) == 3 and int.from_bytes(fields[2], "big").bit_length() >= MIN_RSA_BITS
    if kind.startswith("ecdsa-sha2-"):
        return len(fields) == 3 and fields[1] == kind.removeprefix("ecdsa-sha2-").encode()
    if kind == "sk-ssh-ed25519@openssh.com":
        return len(fields) == 3 and len(fields[1]) == 32
    return len(fields) == 4 and fields[1] == b"nistp256"  # sk-ecdsa-sha2-nistp256@openssh.com


def _parse(line: Any) -> tuple[str, bytes, str]:
    """(type, blob, comment) of one public key line; ValueError (no words: callers say which entry) otherwise."""
    if not isinstance(line, str) or not 0 < len(line) <= MAX_KEY_LINE:
        raise ValueError
    kind, _, rest = line.partition(" ")
    encoded, _, comment = rest.partition(" ")
    if kind not in KEY_TYPES or not _COMMENT_RE.fullmatch(comment):
        raise ValueError
    try:
        blob = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError from None
    if not _blob_ok(kind, _fields(blob)):
        raise ValueError
    return kind, blob, comment


def check_public_key(line: Any) -> str:
    """`line` when it is one OpenSSH public key line ("type base64 [comment]") of an allowed type."""
    try:
        _parse(line)
    except ValueError:
        raise ParseError(
            f"is not one OpenSSH public key line (type, base64 key, optional printable comment; at most "
            f"{MAX_KEY_LINE} characters; no options); allowed types: {_ALLOWED}, RSA of {MIN_RSA_BITS} bits or more"
        ) from None
    return line


def key_fingerprint(line: str) -> str:
    """ "SHA256:<base64>" as `ssh-keygen -l` prints it, for a line check_public_key accepts."""
    _, blob, _ = _parse(line)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_authorized_keys(keys: Any) -> tuple[str, ...]:
    """The keys a guest's login user accepts: at most MAX_AUTHORIZED_KEYS public key lines."""
    if keys is None:
        return ()
    if not isinstance(keys, Sequence) or isinstance(keys, str | bytes):
        raise ParseError("ssh_authorized_keys must be a list of OpenSSH public key lines")
    if len(keys) > MAX_AUTHORIZED_KEYS:
        raise ParseError(f"ssh_authorized_keys lists {len(keys)} keys; at most {MAX_AUTHORIZED_KEYS} are allowed")
    for i, key in enumerate(keys):
        try:
            check_public_key(key)
        except ParseError as e:
            raise ParseError(f"ssh_authorized_keys entry {i} {e}") from None
    return tuple(keys)


def check_user_data(text: Any) -> str | None:
    """User-data as opaque text for cloud-init: UTF-8, no NUL, at most MAX_USER_DATA bytes. Never parsed here."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ParseError("user_data must be text")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ParseError("user_data must be UTF-8 text") from None
    if size > MAX_USER_DATA:
        raise ParseError(f"user_data is {size} bytes; at most {MAX_USER_DATA} are allowed")
    if "\x00" in text:
        raise ParseError("user_data must be text without NUL characters")
    return text
