"""Synthetic hosts for the benchmarks, as HostTopology dicts (docs/design.md §4 shape).

Stdlib only, so both interpreters (ours and the Nova venv) build their engine's view of a host
from the very same dict. Threads follow Linux x86 numbering (sibling j of every core comes after
all siblings j-1 of the host), as tests/unit/hosts.py does.
"""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2
PAGE_BYTES = {"2M": 2 * MiB, "1G": GiB}


def host_dict(
    nodes: int,
    cores_per_node: int = 16,
    threads_per_core: int = 2,
    memory_per_node: int = 128 * GiB,
    hugepages: dict[str, int] | None = None,
) -> dict:
    """A host of `nodes` identical NUMA nodes (default: 32 threads, 128 GiB, 32 GiB of 2M and 16 GiB of 1G pages each)."""
    pages = dict(hugepages if hugepages is not None else {"2M": 16384, "1G": 16})
    total_cores = nodes * cores_per_node
    out = []
    for n in range(nodes):
        cores = []
        for c in range(cores_per_node):
            first = n * cores_per_node + c
            cores.append({"id": c, "threads": [first + j * total_cores for j in range(threads_per_core)]})
        out.append({"id": n, "memory": memory_per_node, "cores": cores, "hugepages": dict(pages)})
    return {"nodes": out, "nics": [], "storage_pools": []}


def host_threads(host: dict) -> int:
    return sum(len(c["threads"]) for n in host["nodes"] for c in n["cores"])
