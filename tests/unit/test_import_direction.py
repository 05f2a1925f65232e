"""Imports run one way (issue 11, docs/design.md §2): parse -> model -> placement -> providers -> service -> cli / charm.

Every project module is given a layer below; a module may import its own layer and the layers under it,
never one above. The workload package (src/vmhost) never imports the charm's modules or ops, and no
project module is imported inside a function (a lazy import hides the graph). A new module fails the
test until it is given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The layer order, lowest first. A name covers the module and, for a package, everything in it.
LAYERS: list[tuple[str, ...]] = [
    # sizes, cpu sets, MAAS strings, SSH keys, image names: total parsers, no project imports
    ("vmhost.parse", "vmhost.guest_access", "vmhost.simplestreams"),
    ("vmhost.model", "vmhost.hostkeys", "vmhost.cloudinit", "vmhost.access"),  # the shared data and the seed
    ("vmhost.placement",),  # the allocator (a package: usage, capacity, numa, nics, disks): pure
    ("vmhost.relation", "vmhost.relation_policy", "vmhost.relation_assignment"),  # the relation's decide(): pure
    ("vmhost.timeouts", "vmhost.hostlock", "vmhost.providers"),  # hypervisor I/O, its bounds and the host lock
    (  # the use cases over one host
        "vmhost.service",
        "vmhost.resources_view",
        "vmhost.machine_setup",
        "vmhost.lxd_setup",
        "vmhost.exporter",  # vmhost serve: metrics and the API
        "vmhost.page",  # the served host page
    ),
    ("vmhost.cli", "charm", "charm_config", "allocation_relation", "charms"),  # the two front ends
]
PROJECT_ROOTS = ("vmhost", "charm", "charm_config", "allocation_relation", "charms")
CHARM_SIDE = ("charm", "charm_config", "allocation_relation", "charms", "ops")


def _matches(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def layer_of(module: str) -> int | None:
    if module == "vmhost":
        return 0  # the package's __init__: a docstring, it imports nothing
    for i, names in enumerate(LAYERS):
        if any(_matches(module, n) for n in names):
            return i
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / ("lib" if path.is_relative_to(ROOT / "lib") else "src")).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> list[Path]:
    files = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "lib/charms/vm_host").rglob("*.py"))]
    return [f for f in files if "egg-info" not in str(f)]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every absolute import in the file."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module, child.lineno, in_function))
                # `from vmhost import service`: the imported name may be a module of its own
                out.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return out


def _project(module: str) -> bool:
    return any(_matches(module, r) for r in PROJECT_ROOTS)


MODULES = project_modules()


def test_every_project_module_has_a_layer():
    missing = [_module_name(p) for p in MODULES if layer_of(_module_name(p)) is None]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_run_one_way(path: Path):
    me = _module_name(path)
    mine = layer_of(me)
    wrong = []
    for module, line, in_function in imports(path):
        if not _project(module) and not _matches(module, "ops"):
            continue
        if in_function and _project(module):
            wrong.append(f"line {line}: {module} imported inside a function (import it at the top)")
        if me.startswith("vmhost") and any(_matches(module, c) for c in CHARM_SIDE):
            wrong.append(f"line {line}: the workload imports the charm side ({module})")
        theirs = layer_of(module) if _project(module) else None
        if mine is not None and theirs is not None and theirs > mine:
            wrong.append(f"line {line}: {me} (layer {mine}) imports {module} (layer {theirs}), a layer above it")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_wrong_way_import(tmp_path):
    """The test would fail if the direction broke: a placement module importing the service is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from vmhost.service import VmHost\n\ndef f():\n    from vmhost import parse\n")
    found = imports(bad)
    assert ("vmhost.service", 1, False) in found and ("vmhost.parse", 4, True) in found
    assert layer_of("vmhost.service") > layer_of("vmhost.placement.usage")
    assert layer_of("vmhost.providers.libvirt_discovery") == layer_of("vmhost.providers")
