#!/usr/bin/env bash
# The main job, end to end on this machine: compose a pinned, hugepage-backed VM, show the host, decompose it.
set -euo pipefail
cd "$(dirname "$0")/.."
vmhost=.venv/bin/vmhost
echo "\$ vmhost compose --backend libvirt --cores 1 --memory 128M --pinned-cores auto --hugepages-backed --start --json"
out=$($vmhost compose --backend libvirt --cores 1 --memory 128M --pinned-cores auto --hugepages-backed --start --json)
echo "$out"
name=$(printf '%s' "$out" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["name"])')
trap '$vmhost decompose --backend libvirt "$name" >/dev/null 2>&1 || true' EXIT
echo
echo "\$ vmhost resources --backend libvirt"
$vmhost resources --backend libvirt
echo
echo "\$ virsh vcpuinfo $name"
virsh vcpuinfo "$name" | grep -E "^(VCPU|CPU Affinity)"
echo
grep HugePages_Free /proc/meminfo
echo
echo "\$ vmhost decompose --backend libvirt $name"
$vmhost decompose --backend libvirt "$name"
trap - EXIT
echo
grep HugePages_Free /proc/meminfo
echo "\$ vmhost list --backend libvirt"
$vmhost list --backend libvirt
