#!/usr/bin/env bash
# The numa test tier's nested host: a debootstrapped Debian bookworm guest (libvirtd, QEMU, sshd,
# numactl) that tests/numa boots under TCG with 2 or 4 NUMA nodes, and a small chroot holding QEMU 10
# from bookworm-backports (the first QEMU that emulates the SR-IOV NIC `-device igb`), so this
# machine's own QEMU is left alone. Both are cached outside the repository, keyed by a hash of this
# script (the package lists are in it; the chroot by its package list): a later run reuses them. Prints the guest's cache directory,
# which holds vmlinuz, initrd.img, rootfs.img, ssh_host_ed25519_key.pub and `qemu10` (the chroot's
# directory). Installs what it needs (debootstrap) itself: CI starts from a fresh machine. Idempotent;
# concurrent runs wait for each other (bounded).
set -euo pipefail
# dbus: debootstrap does not resolve systemd-container's `default-dbus-system-bus | dbus-system-bus`.
GUEST_PACKAGES=linux-image-amd64,systemd-sysv,libpam-systemd,dbus,libvirt-daemon-system,libvirt-clients,qemu-system-x86,qemu-utils,openssh-server,python3,numactl,iproute2,pciutils
QEMU_PACKAGES=qemu-system-x86
SUITE=bookworm
NAME=build-numa-guest
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/debian.sh
source "$here/lib/debian.sh"
ROOTFS_SIZE=3G
key=$( (cat "$here/build-numa-guest.sh" "$here/lib/debian.sh"; echo "$GUEST_PACKAGES $QEMU_PACKAGES") | sha256sum | cut -c1-16)
guest=$cache/numa-guest/$key
# The QEMU chroot depends on its package list only, so editing the guest's part does not rebuild it.
qemu10=$cache/numa-guest/qemu10-$(echo "$SUITE-backports $QEMU_PACKAGES" | sha256sum | cut -c1-16)
debs=$cache/numa-guest/debs  # downloaded .debs (named by version), so a rebuild after an edit fetches less

mkdir -p "$debs"
build_lock "$cache/numa-guest"

if [[ -e $guest/.complete && -e $qemu10/.complete ]]; then
  echo "$guest"
  exit 0
fi

need_packages debootstrap e2fsprogs debian-archive-keyring
make_work "$cache/numa-guest"

if [[ ! -e $qemu10/.complete ]]; then
  log "QEMU 10 chroot from $SUITE-backports"
  root=$work/qemu10
  debootstrap --cache-dir="$debs" --variant=minbase "$SUITE" "$root" "$MIRROR" >&2
  echo "deb $MIRROR $SUITE-backports main" >"$root/etc/apt/sources.list.d/backports.list"
  chroot "$root" apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -q --no-install-recommends \
    -t "$SUITE-backports" ${QEMU_PACKAGES//,/ } >/dev/null
  chroot "$root" apt-get clean
  chroot "$root" qemu-system-x86_64 -device help | grep -q '"igb"' || { log "QEMU in $root has no igb device"; exit 1; }
  rm -rf "$qemu10"
  mv "$root" "$qemu10"
  touch "$qemu10/.complete"
fi

if [[ ! -e $guest/.complete ]]; then
  log "guest root file system ($SUITE, $GUEST_PACKAGES)"
  root=$work/rootfs
  debootstrap --cache-dir="$debs" --include="$GUEST_PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
  chroot "$root" apt-get clean
  echo numa-guest >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 numa-guest\n' >"$root/etc/hosts"
  echo '/dev/vda / ext4 defaults 0 1' >"$root/etc/fstab"
  # DHCP on the virtio NIC only (user-mode networking); the igb NIC and its VFs stay unconfigured.
  mkdir -p "$root/etc/systemd/network"
  printf '[Match]\nDriver=virtio_net\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/10-virtio.network"
  # A bridge with a dummy port, so discovery has a bridge to find remotely.
  printf '[NetDev]\nName=br0\nKind=bridge\n' >"$root/etc/systemd/network/20-br0.netdev"
  printf '[NetDev]\nName=dummy0\nKind=dummy\n' >"$root/etc/systemd/network/21-dummy0.netdev"
  printf '[Match]\nName=br0\n[Network]\nAddress=10.77.0.1/24\nConfigureWithoutCarrier=yes\n' \
    >"$root/etc/systemd/network/22-br0.network"
  printf '[Match]\nName=dummy0\n[Network]\nBridge=br0\n' >"$root/etc/systemd/network/23-dummy0.network"
  chroot "$root" systemctl enable systemd-networkd >/dev/null 2>&1
  # The test's public key arrives through fw_cfg (-fw_cfg name=opt/vmhost/authorized_keys,file=...).
  echo qemu_fw_cfg >"$root/etc/modules-load.d/vmhost.conf"
  cat >"$root/etc/systemd/system/vmhost-key.service" <<'EOF'
[Unit]
Description=root's authorized_keys from QEMU fw_cfg
Before=ssh.service
After=systemd-modules-load.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p -m 700 /root/.ssh && cat /sys/firmware/qemu_fw_cfg/by_name/opt/vmhost/authorized_keys/raw >/root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys'
[Install]
WantedBy=multi-user.target
EOF
  chroot "$root" systemctl enable vmhost-key.service >/dev/null 2>&1
  printf 'PasswordAuthentication no\nUseDNS no\n' >"$root/etc/ssh/sshd_config.d/vmhost.conf"
  # VFs go to domains through vfio; the emulated IOMMU has no interrupt remapping.
  echo 'options vfio_iommu_type1 allow_unsafe_interrupts=1' >"$root/etc/modprobe.d/vmhost-vfio.conf"
  # A default storage pool, as a freshly installed libvirt host would have.
  mkdir -p "$root/etc/libvirt/storage/autostart" "$root/var/lib/libvirt/images"
  cat >"$root/etc/libvirt/storage/default.xml" <<'EOF'
<pool type='dir'>
  <name>default</name>
  <target><path>/var/lib/libvirt/images</path></target>
</pool>
EOF
  ln -sf /etc/libvirt/storage/default.xml "$root/etc/libvirt/storage/autostart/default.xml"
  # The default NAT network needs dnsmasq, which is not installed; nothing here uses it.
  rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"
  chroot "$root" systemctl mask systemd-timesyncd apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    man-db.timer fstrim.timer >/dev/null 2>&1 || true
  out=$work/out
  mkdir -p "$out"
  cp -L "$root/vmlinuz" "$out/vmlinuz"
  cp -L "$root/initrd.img" "$out/initrd.img"
  cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$out/"
  mkfs.ext4 -q -L numa-guest -d "$root" "$out/rootfs.img" "$ROOTFS_SIZE"
  rm -rf "$guest"
  mv "$out" "$guest"
  ln -sfn "$qemu10" "$guest/qemu10"
  touch "$guest/.complete"
fi
log "guest in $guest"
echo "$guest"
