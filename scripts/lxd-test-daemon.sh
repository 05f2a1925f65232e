#!/usr/bin/env bash
# Start a TEST LXD daemon for make test / CI and preseed it (dir pool "default", bridge lxdbr0 with
# no NAT, default profile with root disk + eth0; HTTPS on 127.0.0.1:8443 only). Idempotent: a second run changes nothing.
# The daemon starts with tests/functional/stubs first on PATH: its `modprobe` pretends to load
# vhost_vsock, which LXD insists on before it creates VM records (docs/design.md §9). Test use only.
set -euo pipefail
# The daemons started here outlive this script: they must not inherit a lock its caller holds open
# (`flock /tmp/vmhost-functional.lock make run` would then stay locked for every later run). 255 is bash's own.
for fd in /proc/$$/fd/*; do fd=${fd##*/}; if ((fd > 2 && fd != 255)); then eval "exec $fd<&-"; fi; done
here=$(cd "$(dirname "$0")/.." && pwd)
log=${LXD_TEST_LOG:-/tmp/lxd-test-daemon.log}

command -v lxd >/dev/null || { echo "lxd-test-daemon: lxd is not installed (apt-get install lxd)" >&2; exit 1; }
command -v iptables >/dev/null || { echo "lxd-test-daemon: iptables is not installed (apt-get install iptables)" >&2; exit 1; }

if ! lxc info >/dev/null 2>&1; then
  echo "lxd-test-daemon: starting lxd (log $log)"
  # From /: the daemon's children (rsync for `lxc copy`) inherit its working directory, and a checkout
  # the daemon was started from may be removed while it runs (then rsync fails in getcwd()).
  (cd / && PATH="$here/tests/functional/stubs:$PATH" exec setsid nohup lxd --group root >>"$log" 2>&1 </dev/null) &
fi
if ! lxd waitready --timeout 60; then
  echo "lxd-test-daemon: lxd did not become ready; last log lines:" >&2
  tail -n 20 "$log" >&2 || true
  exit 1
fi

# Preseed only what is missing, so a re-run is a no-op and never fights objects in use.
preseed=""
if ! lxc storage show default >/dev/null 2>&1; then
  preseed+=$'storage_pools:\n- name: default\n  driver: dir\n'
fi
if ! lxc network show lxdbr0 >/dev/null 2>&1; then
  preseed+=$'networks:\n- name: lxdbr0\n  type: bridge\n  config:\n    ipv4.address: 10.197.42.1/24\n    ipv4.nat: "false"\n    ipv6.address: none\n'
fi
profile=$(lxc profile show default)
if ! grep -q 'pool: default' <<<"$profile" || ! grep -q 'network: lxdbr0' <<<"$profile"; then
  preseed+=$'profiles:\n- name: default\n  devices:\n    root:\n      path: /\n      pool: default\n      type: disk\n    eth0:\n      name: eth0\n      network: lxdbr0\n      type: nic\n'
fi
# Listen on loopback only, so tests can use https + client certificates and issue join tokens.
if [[ -z $(lxc config get core.https_address) ]]; then
  preseed+=$'config:\n  core.https_address: 127.0.0.1:8443\n'
fi
if [[ -n $preseed ]]; then
  echo "lxd-test-daemon: preseeding"
  lxd init --preseed <<<"$preseed" >>"$log" 2>&1 || { echo "lxd-test-daemon: preseed failed; see $log" >&2; tail -n 20 "$log" >&2; exit 1; }
fi
echo "lxd-test-daemon: ready (lxd $(lxd --version))"
