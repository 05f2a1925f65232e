"""Placement tests, one module per rule of docs/design.md §4 (and its Interfaces and Storage parts)."""
