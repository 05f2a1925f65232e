# Shell shared by the scripts that build Debian guests from Debian's packages (build-numa-guest.sh,
# build-cloud-image.sh): the archive to use, the host packages to install, a bounded build lock and a
# work directory that is always removed. Source it after setting SUITE and NAME (the log prefix).

# The Debian archive this machine's apt already uses (its first source for the suite), unless given.
apt_mirror() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2; exit }'
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e $f ]] || continue
    awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" } $0 ~ "Suites:[^\n]*[ ]" s "([ ]|$|\n)" {
      for (i = 1; i <= NF; i++) if ($i ~ /^URIs:/) { split($i, u, " "); print u[2]; exit } }' "$f"
  done
}
MIRROR=${VMHOST_DEBIAN_MIRROR:-$(apt_mirror | head -1)}
[[ -n $MIRROR ]] || { echo "$NAME: no apt source for $SUITE on this machine; set VMHOST_DEBIAN_MIRROR" >&2; exit 1; }
cache=${VMHOST_CACHE:-/var/cache/vmhost}
log() { echo "$NAME: $*" >&2; }

# Install the host packages given that are missing (CI starts from a fresh machine).
need_packages() {
  local need=() p
  for p in "$@"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"ok installed"* ]] || need+=("$p")
  done
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# Hold DIR/.lock for the rest of the script; concurrent builds wait for each other (bounded).
build_lock() {
  mkdir -p "$1"
  exec 9>"$1/.lock"
  flock -w 1800 9 || { log "another build held the lock for 30 minutes; giving up"; exit 1; }
}

# A work directory under DIR, removed on exit whatever happens.
make_work() {
  work=$(mktemp -d "$1/.build-XXXXXX")
  trap cleanup_work EXIT
}
cleanup_work() {
  # debootstrap mounts proc and sys in its target; never let rm follow a mount back into the host.
  findmnt -rn -o TARGET | grep "^$work/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$work"
}
