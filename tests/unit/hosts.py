"""Synthetic hosts for placement tests and benchmarks: builders plus hypothesis strategies.

Thread numbering follows Linux on x86: thread j of every core comes after all threads j-1 of the
host (core c of node n has threads base+c, base+c+T, ... where T is the host's core count), so
siblings are far apart and nodes are contiguous in the first sibling set, as on real machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import strategies as st

from vmhost.model import Core, HostTopology, Nic, NumaNode, Policy, StoragePool
from vmhost.parse import HUGEPAGE_SIZES

GiB = 1024**3
MiB = 1024**2


def synthetic_host(
    nodes: int = 2,
    cores_per_node: int = 4,
    threads_per_core: int = 2,
    memory_per_node: int = 64 * GiB,
    hugepages: Mapping[str, int] | Sequence[Mapping[str, int]] | None = None,
    nics: Sequence[Nic] = (),
    storage_pools: Sequence[StoragePool] = (),
) -> HostTopology:
    """A host of `nodes` identical NUMA nodes; `hugepages` is one {size: pages} for every node or one per node."""
    total_cores = nodes * cores_per_node
    per_node = list(hugepages) if isinstance(hugepages, Sequence) else [dict(hugepages or {})] * nodes
    out = []
    for n in range(nodes):
        cores = []
        for c in range(cores_per_node):
            first = n * cores_per_node + c
            cores.append(Core(id=c, threads=tuple(first + j * total_cores for j in range(threads_per_core))))
        out.append(NumaNode(id=n, memory=memory_per_node, cores=tuple(cores), hugepages=dict(per_node[n])))
    return HostTopology(nodes=tuple(out), nics=tuple(nics), storage_pools=tuple(storage_pools))


@st.composite
def hosts(draw, max_nodes: int = 16, max_cores_per_node: int = 8) -> HostTopology:
    """Hosts of 1..max_nodes NUMA nodes, SMT 1 or 2, some hugepages of both sizes per node."""
    nodes = draw(st.integers(1, max_nodes))
    cores = draw(st.integers(1, max_cores_per_node))
    tpc = draw(st.integers(1, 2))
    memory = draw(st.sampled_from([4, 8, 16])) * GiB
    pages = draw(
        st.lists(
            st.fixed_dictionaries({"2M": st.sampled_from([0, 256, 512, 1024]), "1G": st.integers(0, 2)}),
            min_size=nodes,
            max_size=nodes,
        )
    )
    # Never more hugepage memory than the node has.
    for p in pages:
        while sum(HUGEPAGE_SIZES[s] * n for s, n in p.items()) > memory:
            p["2M"] //= 2
            p["1G"] = max(0, p["1G"] - 1)
    return synthetic_host(nodes, cores, tpc, memory, pages)


@st.composite
def policies(draw, host: HostTopology) -> Policy:
    """Overcommit ratios, some reserved threads and reserved memory for `host`."""
    threads = sorted(host.thread_node)
    reserved = draw(st.lists(st.sampled_from(threads), max_size=max(0, len(threads) // 4), unique=True))
    return Policy(
        cpu_overcommit_ratio=draw(st.sampled_from([1.0, 1.5, 4.0])),
        memory_overcommit_ratio=draw(st.sampled_from([1.0, 1.25])),
        reserved_cores=tuple(sorted(reserved)),
        reserved_memory=draw(st.sampled_from([0, 512 * MiB, 2 * GiB])),
    )
