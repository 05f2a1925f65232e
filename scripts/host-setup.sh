#!/usr/bin/env bash
# Make this machine a local VM host for vm-host's own jobs (make run / make test / CI):
# system packages, hugepages + hugetlbfs, libvirtd (and, with --lxd, an LXD daemon).
# Idempotent; safe to run again. Needs root.
set -euo pipefail
# The daemons started here outlive this script: they must not inherit a lock its caller holds open
# (`flock /tmp/vmhost-functional.lock make run` would then stay locked for every later run). 255 is bash's own.
for fd in /proc/$$/fd/*; do fd=${fd##*/}; if ((fd > 2 && fd != 255)); then eval "exec $fd<&-"; fi; done
here=$(cd "$(dirname "$0")/.." && pwd)
want_lxd=0
[[ ${1:-} == --lxd ]] && want_lxd=1

PKGS=(libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-clients
      libvirt-dev pkg-config genisoimage dnsmasq-base bridge-utils iproute2 iptables ovmf
      prometheus chromium)  # prometheus (+ promtool) and headless chromium: the observability tests
((want_lxd)) && PKGS+=(lxd)
missing=()
for p in "${PKGS[@]}"; do [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"ok installed"* ]] || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "host-setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2M hugepages on every node (the demo and functional tests need 1 GiB of them), hugetlbfs mounted
# at /dev/hugepages BEFORE libvirtd starts, so QEMU can back guest memory with them.
HP_PER_NODE=${VMHOST_TEST_HUGEPAGES:-512}
for node in /sys/devices/system/node/node*; do
  f=$node/hugepages/hugepages-2048kB/nr_hugepages
  if [[ -w $f ]] && (( $(cat "$f") < HP_PER_NODE )); then echo "$HP_PER_NODE" > "$f"; fi
done
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs hugetlbfs /dev/hugepages

# No udev here: give /dev/kvm the group and mode Debian's udev rule would, or QEMU (libvirt-qemu) cannot open it.
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi

# libvirtd: no systemd on these machines, so start the daemons ourselves.
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi
virsh -c qemu:///system version >/dev/null
# A "default" dir storage pool for volumes.
if ! virsh -q pool-info default >/dev/null 2>&1; then
  mkdir -p /var/lib/libvirt/images
  virsh -q pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
fi
mkdir -p /var/lib/vmhost/images  # libvirt-image-dir: where image=NAME is looked up
virsh -q pool-autostart default >/dev/null 2>&1 || true
[[ $(virsh -q pool-info default) == *"State:"*running* ]] || virsh -q pool-start default >/dev/null
# A bridge for test VMs to attach to (no uplink: nothing leaves this machine).
if ! ip link show vmhostbr0 >/dev/null 2>&1; then
  ip link add vmhostbr0 type bridge
  ip link set vmhostbr0 up
fi

if ((want_lxd)); then
  "$here/scripts/lxd-test-daemon.sh"
fi
echo "host-setup: ready (libvirt $(virsh -c qemu:///system version 2>/dev/null | awk '/library/ {print $NF; exit}'), $(grep HugePages_Free /proc/meminfo))"
