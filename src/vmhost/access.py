"""How a caller's SSH keys and user-data become a VM's CloudInit, the same for the CLI, the charm's
compose action and the relation: validated and bounded here (vmhost.cloudinit's checks), before any
hypervisor is touched."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmhost.cloudinit import MAX_SSH_KEYS, check_ssh_keys, check_user_data
from vmhost.guest_access import MAX_KEY_LINE
from vmhost.model import CloudInit

__all__ = ["cloud_init_for", "read_arg", "ssh_key_lines"]

MAX_KEY_FILE = MAX_SSH_KEYS * (MAX_KEY_LINE + 1)


def read_arg(value: str, what: str, limit: int) -> str:
    """`value` itself, or the text of FILE for `@FILE` (at most `limit` bytes, UTF-8)."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"{what} file {str(path)[:200]!r} cannot be read: {e.strerror or e}") from None
    if len(data) > limit:
        raise ValueError(f"{what} file {str(path)[:200]!r} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {str(path)[:200]!r} is not UTF-8 text") from None


def ssh_key_lines(values: Sequence[str]) -> tuple[str, ...]:
    """SSH keys from KEY or @FILE values; a file holds one key a line (blank lines and # comments skipped)."""
    keys: list[str] = []
    for value in values:
        text = read_arg(value, "SSH key", MAX_KEY_FILE)
        if value.startswith("@"):
            keys += [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        else:
            keys.append(text)
    return check_ssh_keys(keys)


def cloud_init_for(
    hostname: str | None, ssh_keys: Sequence[str] = (), user_data: str | None = None
) -> CloudInit | None:
    """The CloudInit for validated keys and user-data, or None when neither is given (the default seed).

    hostname None or empty: the VM's own name, filled in once placement has named it (VmHost.compose).
    """
    keys = check_ssh_keys(ssh_keys)
    if user_data is not None:
        check_user_data(user_data)
    if not keys and user_data is None:
        return None
    return CloudInit(hostname=hostname or "", ssh_authorized_keys=keys, user_data=user_data)
