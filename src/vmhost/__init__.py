"""vm-host workload: NUMA-aware VM composition on LXD and libvirt/KVM. Never imports ops."""

__version__ = "0.1.0"
