"""Which provider plugins exist, and the one factory that builds one for the CLI and the charm alike.

One registry: the `vmhost.providers` entry-point group. The built-ins (`libvirt`, `lxd`) are declared
there too, in pyproject.toml, and found the same way as a third party's plugin.

Why there is still a table here: the packed charm runs vmhost unpackaged. charmcraft's uv plugin
builds the charm's venv with `uv sync --no-install-project`, so no vm-host dist-info exists there and
the built-ins' entry points with it (the plugin gives no way to install the project itself). Only
then, when the vm-host distribution is not installed, does `BUILTIN_PROVIDERS` stand in for its
entry points; a unit test keeps the table equal to pyproject's. Third-party plugins are found through
their own distributions' entry points in both cases.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution, entry_points

from vmhost.providers.base import Provider, ProviderError
from vmhost.timeouts import DEFAULT_CALL_TIMEOUT

__all__ = [
    "BUILTIN_PROVIDERS",
    "DISTRIBUTION",
    "ENTRY_POINT_GROUP",
    "ProviderSettings",
    "available_providers",
    "make_provider",
    "own_providers",
]

ENTRY_POINT_GROUP = "vmhost.providers"
DISTRIBUTION = "vm-host"
# The vm-host distribution's own entry points, for when it is not installed (see the module docstring).
BUILTIN_PROVIDERS = {
    "libvirt": "vmhost.providers.libvirt:LibvirtProvider",
    "lxd": "vmhost.providers.lxd:LxdProvider",
}


def own_providers() -> dict[str, str]:
    """The plugins vm-host itself ships: its distribution's entry points, or the table when unpackaged."""
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:
        return dict(BUILTIN_PROVIDERS)
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}


def available_providers() -> dict[str, str]:
    """Provider "module:Class" paths by name: vm-host's own plus every installed distribution's."""
    return {**own_providers(), **{ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}}


@dataclass(frozen=True)
class ProviderSettings:
    """What a provider is built from: the backend's name, where it is, the call time limit, and the
    backend's own options (each must be a keyword its class takes; anything else is refused)."""

    backend: str
    uri: str | None = None
    timeout: float = DEFAULT_CALL_TIMEOUT
    options: Mapping[str, object] = field(default_factory=dict)


def _options_of(cls: type) -> list[str]:
    """The keyword options a provider class takes besides uri and timeout (no catch-all **options)."""
    params = inspect.signature(cls).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(p.name for p in params if p.kind in kinds and p.name not in ("uri", "timeout"))


def make_provider(settings: ProviderSettings) -> Provider:
    """The provider plugin `settings.backend`, built with its settings; an option it does not take is refused."""
    name = settings.backend
    paths = own_providers()
    if name not in paths:  # only then scan every installed distribution: that is the slow part
        paths = available_providers()
    if name not in paths:
        raise ProviderError(f"backend {name!r} is not available; installed: {', '.join(sorted(paths)) or 'none'}")
    module, _, attr = paths[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    takes = _options_of(cls)
    unknown = sorted(set(settings.options) - set(takes))
    if unknown:
        raise ProviderError(
            f"backend {name!r} has no option {', '.join(map(repr, unknown))}; it takes: {', '.join(takes) or 'none'}"
        )
    return cls(uri=settings.uri, timeout=settings.timeout, **settings.options)
