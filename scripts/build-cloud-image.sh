#!/usr/bin/env bash
# The functional tier's bootable cloud image: Debian bookworm from Debian's packages (debootstrap) with
# the cloud kernel, cloud-init (NoCloud), openssh-server, qemu-guest-agent and netplan + systemd-networkd
# (what cloud-init renders DHCP for), on an MBR disk whose FAT boot partition carries SYSLINUX, the
# kernel and the initrd, and whose ext4 root (LABEL=cloudimg-rootfs, grown by cloud-init) is the last
# partition. Console on ttyS0. No SSH host keys and an empty machine-id: every VM makes its own.
# Built without loop devices or mounts (mkfs.ext4 -d, mtools, syslinux --install on the FAT image).
# Cached outside the repository, keyed by a hash of its inputs (suite, package lists, sizes and the build
# steps below the "build" marker): a later run reuses it. Prints the path of the compressed qcow2. Installs what it needs (apt) itself:
# CI starts from a fresh machine. Idempotent; concurrent runs wait for each other (bounded).
# `--path` prints where the image is (or would be) and builds nothing: tests find it that way.
set -euo pipefail
# dbus: debootstrap does not resolve systemd's dbus alternatives; sudo: cloud-init's sudo rule for the user.
BASE_PACKAGES=linux-image-cloud-amd64,systemd-sysv,dbus,udev,openssh-server,sudo,iproute2
# Installed by apt in the chroot afterwards: debootstrap's own ordering cannot configure cloud-init's
# Python dependencies (python3-cryptography fails before python3 is set up).
PACKAGES="cloud-init cloud-guest-utils qemu-guest-agent netplan.io"
SUITE=bookworm
NAME=build-cloud-image
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/debian.sh
source "$here/lib/debian.sh"
ROOT_SIZE_MB=1800  # the image's virtual size is this plus the boot partition; a VM's root disk must hold it
BOOT_SIZE_MB=120
key=$( (echo "$SUITE $BASE_PACKAGES $PACKAGES $ROOT_SIZE_MB $BOOT_SIZE_MB"; sed -n '/^# --- build/,$p' "$here/build-cloud-image.sh") |
  sha256sum | cut -c1-16)
dir=$cache/cloud-image
image=$dir/$key/debian-$SUITE-cloud.qcow2
if [[ ${1:-} == --path ]]; then
  echo "$image"
  exit 0
fi

build_lock "$dir"
if [[ -e $image ]]; then
  echo "$image"
  exit 0
fi

# --- build (everything from here on is part of the cache key)
need_packages debootstrap e2fsprogs debian-archive-keyring dosfstools mtools syslinux syslinux-common fdisk qemu-utils
make_work "$dir"
debs=$dir/debs  # downloaded .debs, so a rebuild after an edit fetches less
mkdir -p "$debs"

log "root file system ($SUITE, $BASE_PACKAGES, then $PACKAGES)"
root=$work/root
debootstrap --cache-dir="$debs" --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"  # install, never start, services in the chroot
chmod +x "$root/usr/sbin/policy-rc.d"
chroot "$root" apt-get update -q >/dev/null
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -q --no-install-recommends $PACKAGES >&2
rm -f "$root/usr/sbin/policy-rc.d"
umount "$root/proc"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
: >"$root/etc/resolv.conf"
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo localhost >"$root/etc/hostname"
echo 'LABEL=cloudimg-rootfs / ext4 defaults,discard 0 1' >"$root/etc/fstab"
cat >"$root/etc/cloud/cloud.cfg.d/90-vmhost.cfg" <<'CFG'
# vm-host's seed is a NoCloud cidata volume (libvirt) or LXD's own; never wait for a metadata server.
datasource_list: [NoCloud, LXD, None]
# No locales package here (C.UTF-8 is built in): setting one would fail and mark cloud-init's run an error.
locale: false
CFG
# The kernel and initrd live on the FAT boot partition; apt's kernel hooks are not expected to run here.
boot=$work/boot.img
kernel=$(readlink -f "$root/vmlinuz")
initrd=$(readlink -f "$root/initrd.img")
mkfs.vfat -n BOOT -C "$boot" $((BOOT_SIZE_MB * 1024)) >/dev/null
cat >"$work/syslinux.cfg" <<'CFG'
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND root=LABEL=cloudimg-rootfs ro console=tty0 console=ttyS0,115200n8
CFG
mcopy -i "$boot" "$kernel" ::/vmlinuz
mcopy -i "$boot" "$initrd" ::/initrd.img
mcopy -i "$boot" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$boot"
rootimg=$work/root.img
mkfs.ext4 -q -L cloudimg-rootfs -d "$root" "$rootimg" "${ROOT_SIZE_MB}M"

raw=$work/disk.raw
total_mb=$((1 + BOOT_SIZE_MB + ROOT_SIZE_MB))
truncate -s "${total_mb}M" "$raw"
# 1 MiB alignment; partition 1 (FAT32 LBA, active) boots, partition 2 is the root.
printf 'label: dos\nstart=2048, size=%d, type=c, bootable\nstart=%d, type=83\n' \
  $((BOOT_SIZE_MB * 2048)) $(((1 + BOOT_SIZE_MB) * 2048)) | sfdisk -q "$raw"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$boot" of="$raw" bs=1M seek=1 conv=notrunc status=none
dd if="$rootimg" of="$raw" bs=1M seek=$((1 + BOOT_SIZE_MB)) conv=notrunc status=none
mkdir -p "$dir/$key"
qemu-img convert -c -f raw -O qcow2 "$raw" "$work/out.qcow2"
mv "$work/out.qcow2" "$image"
log "image $image ($(du -h "$image" | cut -f1))"
echo "$image"
