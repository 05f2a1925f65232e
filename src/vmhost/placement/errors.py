"""Rule 7 (docs/design.md §4): a refusal says what is short, where and by how much.

Every part of placement raises this one error; `per_node` is the form its per-node counts take.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PlacementError", "per_node"]


class PlacementError(ValueError):
    """The host cannot hold the request; `str(error)` says what is short, where and by how much."""


def per_node(values: Sequence[tuple[int, str]]) -> str:
    """Rule 7's form for what each node has: "node 0 has 1024 free, node 1 has 0"."""
    parts = [
        f"node {node} has {value}" + (" free" if position == 0 else "") for position, (node, value) in enumerate(values)
    ]
    return ", ".join(parts) if parts else "the host has no NUMA nodes"
