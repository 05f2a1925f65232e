#!/usr/bin/env bash
# The build tools from PyPI, in a venv cached outside the repository (keyed by their versions): charmcraft
# for `make charm` and `charmcraft analyse`, uv for the lock and the development venv. Built on Debian's python3 so python3-apt (which craft-parts needs to install
# build-packages) can be linked in. Prints the venv's path. Idempotent.
set -euo pipefail
CHARMCRAFT_VERSION=4.5.0
UV_VERSION=0.13.9
cache=${VMHOST_CACHE:-/var/cache/vmhost}
venv=$cache/tools-charmcraft-$CHARMCRAFT_VERSION-uv-$UV_VERSION
if [[ ! -e $venv/.complete ]]; then
  need=()
  for p in python3-apt python3-venv python3-dev; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"ok installed"* ]] || need+=("$p")
  done
  if ((${#need[@]})); then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  fi
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "charmcraft==$CHARMCRAFT_VERSION" "uv==$UV_VERSION" 2>&1 | grep -v 'is ignored' >&2 || true
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for f in /usr/lib/python3/dist-packages/{apt,aptsources,apt_pkg.cpython-*.so,apt_inst.cpython-*.so}; do
    [[ -e $f ]] && ln -sf "$f" "$site/"
  done
  "$venv/bin/python" -c 'import apt, charmcraft' >&2
  touch "$venv/.complete"
fi
echo "$venv"
