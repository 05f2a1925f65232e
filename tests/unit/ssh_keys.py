"""Real OpenSSH public keys (made once with ssh-keygen; their private halves were thrown away) for the tests."""

from __future__ import annotations

import base64
import hashlib

from vmhost.model import HostKey

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@host"
ECDSA = (
    "ecdsa-sha2-nistp256 "
    "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBH5qyQhY0ZMGWuSPDpRBl5U3JUMwxCAzUJl9Ox"
    "wAoV3z5Y1XiM906Wih258EOi4xSme7Fg/Q9OAtQU0Otk1Z2yo="
    " test@ecdsab256"
)
RSA = (
    "ssh-rsa "
    "AAAAB3NzaC1yc2EAAAADAQABAAABAQDHYd7P5gQHWTbviKgphW/FGTgsfqiK+AzUgL0C7AJZz2Jn8rO3GVemS0KL87"
    "u0utDwLgIw8uVHAmpoIYmdTWMZxQ1pckVE4XRwQlxxK05dmFhk5qjPaW2ceTmMOhBhL36HveZBkRs08Y4oWp5F96Yy"
    "uVafaGiDwZC0JjKeigizWAdis4MAAUYjLCR+WokE60jM/THV5ZS/AHDfjywcWRBj0XkGfoZK1zfS9oih99ChxocVuC"
    "T1IOfC9Y97rvUfmHBeqE8qGmufGklKQddWHiZyToACiZIr33Ql7fyn/Y4lj2qvu9bzFBYGcDjJyp+B714VtUalNhmJ"
    "RFpfxAAiXhBb"
    " test@rsab2048"
)
RSA_1024 = (
    "ssh-rsa "
    "AAAAB3NzaC1yc2EAAAADAQABAAAAgQDeFBMQ6qV3yrwZ+pWifqWWHV+n63GNnzlAphycIm4b8LKL8ydyc0xHhEfOP9"
    "NQEkyl5rFGah7NVAOXb1oin2SLO6YKJ918sWwbEZcxf0RtEvXQaCD5Q7lPaWwRfiAhK29ewIHbRUU6KaKs+7THLf/W"
    "rIpnZ4Yqvp5LTpGeOzbyLQ=="
    " test@rsab1024"
)
DSA = (
    "ssh-dss "
    "AAAAB3NzaC1kc3MAAACBAJIs0kUudQU3qAnmlSCi76190aXtxT9BMWsiIL8zoVxZNKXuSbY36VjWTDEH4dOD26RESC"
    "tB2H6kLUkd4TUarJCV1W3E7eDvxVMWAOY/VWNUhLazf5nWbX7+Lu9V4MgjXX3EVJtW+2ZexdrD4wn4667vTlBzPepf"
    "Flean1U40SoJAAAAFQDIiKmI6Lte7QfTl24o5dop9HeyRQAAAIEAgf6TmqHHpbmc3ELLHCJCJPVHYF1Lw6swLFhcK9"
    "b3K7aKfjO6W59ptMikEKISkr1Iny1NgliG4kS7QoeZ1rbysY9fynAkpcx2ich6Xv78EFaZjhLUws/jMobkJV74YPTB"
    "AxRaoNkDO+EwOBvjbwZG4huYxXILUg+bn8NqhVtBDAAAAACBAIPaHextfIBNlhoTIcuIp5kt6V8miETBS5UIt0hojO"
    "a358JHiVcjcvBDS12RBRJ19Je3dsgkZFsw3d1NzaluUv4YhkOC7DnB6FsKNH+llLQh+wWSm+lIQ28xth2FmgkPSOEh"
    "Asj7ELhl26K3xqC1CEBh+UfkPYKDkJlJwJhZujJP"
    " test@dsa"
)


def _wire(*fields: bytes) -> str:
    return base64.b64encode(b"".join(len(f).to_bytes(4, "big") + f for f in fields)).decode()


# A FIDO (security key) ed25519 key, built from its wire format: no hardware here to make one.
SK_ED25519 = f"sk-ssh-ed25519@openssh.com {_wire(b'sk-ssh-ed25519@openssh.com', bytes(range(32)), b'ssh:')} me@yubikey"


def host_key(line: str) -> HostKey:
    """The HostKey a provider reports for a public key line: no comment, SHA256 fingerprint as ssh-keygen -l."""
    kind, blob, *_ = line.split(" ")
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")
    return HostKey(kind, f"{kind} {blob}", f"SHA256:{digest}")
