"""The `vmhost` command: the charm's actions without Juju, against this host or a remote one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from vmhost.access import cloud_init_for, read_arg, ssh_key_lines
from vmhost.cloudinit import MAX_USER_DATA
from vmhost.exporter import make_server
from vmhost.model import BOOT_MODES, DEFAULT_LOGIN_USER, Policy, VmRequest
from vmhost.parse import ParseError
from vmhost.placement import PlacementError
from vmhost.providers.base import ProviderError
from vmhost.providers.libvirt_xml import DOMAIN_TYPES
from vmhost.providers.registry import ProviderSettings, make_provider
from vmhost.resources_view import render_view, vm_line
from vmhost.service import STOP_WAIT, HostLockBusy, VmHost, check_boot
from vmhost.simplestreams import DEFAULT_IMAGE_SERVER, is_stream_name
from vmhost.timeouts import (
    CALL_TIMEOUT_RANGE,
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    LOCK_TIMEOUT_RANGE,
    HypervisorTimeout,
    seconds,
)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend", default=os.environ.get("VMHOST_BACKEND", "libvirt"), help="lxd or libvirt")
    p.add_argument("--uri", default=os.environ.get("VMHOST_URI"), help="qemu+ssh://... or https://host:8443")
    p.add_argument("--cert", help="LXD client certificate (PEM) for a remote https URI")
    p.add_argument("--key", help="LXD client key (PEM) for a remote https URI")
    p.add_argument("--server-cert", help="LXD server certificate (PEM) to trust for a remote https URI")
    p.add_argument("--project", help="LXD project (default: vmhost)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    # Read as text and checked by Policy.from_dict, so a bad value from the environment is one sentence too.
    p.add_argument("--cpu-overcommit-ratio", default=os.environ.get("VMHOST_CPU_OVERCOMMIT", "1.0"), help="0.1 to 64")
    p.add_argument("--memory-overcommit-ratio", default=os.environ.get("VMHOST_MEM_OVERCOMMIT", "1.0"), help="0.1 to 4")
    p.add_argument("--reserved-cores", default=os.environ.get("VMHOST_RESERVED_CORES", ""), help="e.g. 0-1")
    p.add_argument(
        "--reserved-memory",
        default=os.environ.get("VMHOST_RESERVED_MEMORY", "0"),
        help="e.g. 2G (a bare number is MiB)",
    )
    p.add_argument("--default-storage-pool", default=os.environ.get("VMHOST_DEFAULT_POOL"))
    p.add_argument(
        "--image-server",
        default=os.environ.get("VMHOST_IMAGE_SERVER"),
        help=f"simplestreams server for <os>:<alias> images (env VMHOST_IMAGE_SERVER; default {DEFAULT_IMAGE_SERVER})",
    )
    p.add_argument(
        "--image-server-cert",
        default=os.environ.get("VMHOST_IMAGE_SERVER_CERT"),
        help="PEM certificate to trust for an https image server of your own (env VMHOST_IMAGE_SERVER_CERT)",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        help=f"time limit on each hypervisor call (env VMHOST_TIMEOUT; default {DEFAULT_CALL_TIMEOUT:g}, "
        f"{CALL_TIMEOUT_RANGE[0]:g}-{CALL_TIMEOUT_RANGE[1]:g})",
    )
    p.add_argument(
        "--lock-timeout",
        metavar="SECONDS",
        help=f"how long to wait for another vmhost process to release the host lock (env VMHOST_LOCK_TIMEOUT; "
        f"default {DEFAULT_LOCK_TIMEOUT:g}, {LOCK_TIMEOUT_RANGE[0]:g}-{LOCK_TIMEOUT_RANGE[1]:g})",
    )
    p.add_argument(
        "--domain-type",
        default=os.environ.get("VMHOST_DOMAIN_TYPE", "auto"),
        choices=("auto", *DOMAIN_TYPES),
        help="libvirt: kvm, qemu (TCG, emulated) or auto (kvm where the hypervisor offers it; env VMHOST_DOMAIN_TYPE)",
    )
    p.add_argument(
        "--confine-foreign-vms",
        default=os.environ.get("VMHOST_CONFINE_FOREIGN_VMS", "true"),
        help="true (default) keeps running VMs vm-host did not make off pinned threads; false only reports them",
    )
    return p


def _seconds(given: str | None, flag: str, env: str, default: float, limits: tuple[float, float]) -> float:
    """A time limit from its flag, else its environment variable, else the default; one sentence if bad."""
    if given is not None:
        return seconds(given, flag, limits)
    if os.environ.get(env):
        return seconds(os.environ[env], env, limits)
    return default


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="vmhost", description="Compose NUMA-aware VMs on LXD or libvirt/KVM.")
    # `vmhost --json list` as well as `vmhost list --json` (its own dest: a subcommand's default would overwrite it).
    parser.add_argument("--json", action="store_true", dest="json_before", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("resources", parents=[common], help="per NUMA node cores, memory, hugepages, VFs, VMs")
    c = sub.add_parser("compose", parents=[common], help="place and create a VM")
    c.add_argument("--cores", type=int, default=None, help="default 1, or one per --pinned-cores CPU (as MAAS)")
    c.add_argument("--memory", default=None, help="e.g. 8G, 512M (a bare number is MiB, as in MAAS); default 2048M")
    c.add_argument("--pinned-cores", help="auto, or host CPUs such as 2,3 or 4-7")
    c.add_argument("--hugepages-backed", action="store_true")
    c.add_argument("--hugepage-size", help="2M or 1G")
    c.add_argument("--numa-nodes", help="exactly this many NUMA nodes, 1 to never span (default: the fewest)")
    c.add_argument("--storage", help="MAAS storage, e.g. root:20(ssd),data:100")
    c.add_argument("--interfaces", help="MAAS interfaces, e.g. eth0:space=public;eth1:subnet=10.20.0.0/24")
    c.add_argument("--hostname", help="VM name and guest hostname (default: generated)")
    c.add_argument("--pool", help="resource pool this VM belongs to")
    c.add_argument("--start", action="store_true", help="start the VM once composed")
    c.add_argument("--boot", default="network", choices=BOOT_MODES)
    c.add_argument(
        "--image",
        help="for --boot image: <os>:<alias> from the image server (ubuntu:24.04), or a local image path or "
        "name (libvirt) or alias (LXD)",
    )
    c.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        metavar="KEY|@FILE",
        help=f"an OpenSSH public key for the login user {DEFAULT_LOGIN_USER!r}, or @FILE of them (repeatable)",
    )
    c.add_argument(
        "--user-data",
        metavar="TEXT|@FILE",
        help="cloud-init user-data (#cloud-config is merged with vm-host's; a script or MIME travels beside it)",
    )
    c.add_argument("--dry-run", action="store_true", help="print the placement, create nothing")
    d = sub.add_parser("decompose", parents=[common], help="delete a VM and its volumes")
    d.add_argument("name")
    ls = sub.add_parser("list", parents=[common], help="VMs on this host")
    ls.add_argument("--pool")
    s = sub.add_parser("start", parents=[common], help="start a VM")
    s.add_argument("name")
    st = sub.add_parser("stop", parents=[common], help="stop a VM")
    st.add_argument("name")
    st.add_argument("--force", action="store_true", help="power off instead of asking the guest to shut down")
    st.add_argument(
        "--wait",
        type=_wait_seconds,
        default=STOP_WAIT,
        help=f"seconds to wait for the guest to shut down (0-3600, default {STOP_WAIT:g}); still running after it is an error",
    )
    sub.add_parser("gc", parents=[common], help="remove what a crashed compose left behind")
    im = sub.add_parser("images", help="base images kept for <os>:<alias> images")
    im_sub = im.add_subparsers(dest="images_command", required=True)
    im_sub.add_parser("list", parents=[common], help="base images and the volumes or VMs using each")
    pr = im_sub.add_parser("prune", parents=[common], help="remove the base images no VM uses")
    pr.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    sv = sub.add_parser("serve", parents=[common], help="serve /metrics, a live page and /api/resources (read-only)")
    sv.add_argument(
        "--listen",
        default=os.environ.get("VMHOST_LISTEN", "127.0.0.1:9477"),
        help="IP:PORT to listen on (default 127.0.0.1:9477; [::]:9477 for IPv6)",
    )
    return parser


def _wait_seconds(text: str) -> float:
    try:
        return seconds(text, "--wait", (0, 3600))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Where each policy value comes from, for the error that names a bad one.
_POLICY_SOURCES = {
    "cpu_overcommit_ratio": "--cpu-overcommit-ratio or VMHOST_CPU_OVERCOMMIT",
    "memory_overcommit_ratio": "--memory-overcommit-ratio or VMHOST_MEM_OVERCOMMIT",
    "reserved_cores": "--reserved-cores or VMHOST_RESERVED_CORES",
    "reserved_memory": "--reserved-memory or VMHOST_RESERVED_MEMORY",
    "confine_foreign_vms": "--confine-foreign-vms or VMHOST_CONFINE_FOREIGN_VMS",
}


def _policy(args: argparse.Namespace) -> Policy:
    values = {
        "cpu_overcommit_ratio": args.cpu_overcommit_ratio,
        "memory_overcommit_ratio": args.memory_overcommit_ratio,
        "reserved_cores": args.reserved_cores or None,
        "reserved_memory": args.reserved_memory,
        "confine_foreign_vms": args.confine_foreign_vms,
    }
    for key, source in _POLICY_SOURCES.items():
        try:
            Policy.from_dict({key: values[key]})
        except ParseError as e:
            raise ParseError(f"{e} (set by {source})") from None
    return Policy.from_dict({**values, "default_storage_pool": args.default_storage_pool})


def _host(args: argparse.Namespace) -> VmHost:
    timeout = _seconds(args.timeout, "--timeout", "VMHOST_TIMEOUT", DEFAULT_CALL_TIMEOUT, CALL_TIMEOUT_RANGE)
    options: dict[str, object] = {}
    lock_timeout = _seconds(
        args.lock_timeout, "--lock-timeout", "VMHOST_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT, LOCK_TIMEOUT_RANGE
    )
    if args.backend == "lxd":
        if args.cert and args.key:
            options["cert"] = (args.cert, args.key)
        if args.project:
            options["project"] = args.project
        if args.server_cert:
            options["verify"] = args.server_cert
    elif args.backend == "libvirt" and args.domain_type != "auto":
        options["domain_type"] = args.domain_type
    if args.image_server:
        options["image_server"] = args.image_server
    if args.image_server_cert:
        options["image_server_cert"] = args.image_server_cert
    policy = _policy(args)  # before connecting: a bad value is refused without touching the hypervisor
    provider = make_provider(ProviderSettings(args.backend, uri=args.uri, timeout=timeout, options=options))
    return VmHost(provider, policy, lock_timeout=lock_timeout)


def _request(args: argparse.Namespace) -> VmRequest:
    return VmRequest.from_dict(
        {
            "cores": args.cores,
            "memory": args.memory,
            "pinned_cores": args.pinned_cores,
            "hugepages_backed": args.hugepages_backed,
            "hugepage_size": args.hugepage_size,
            "numa_nodes": args.numa_nodes,
            "storage": args.storage,
            "interfaces": args.interfaces,
            "name": args.hostname,
            "pool": args.pool,
        }
    )


def _emit(args: argparse.Namespace, data, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return serve(args)
    host = _host(args)
    try:
        if args.command == "resources":
            res = host.resources()
            _emit(args, res, render_view(res))
        elif args.command == "compose":
            request = _request(args)
            user_data = read_arg(args.user_data, "user-data", MAX_USER_DATA) if args.user_data is not None else None
            cloud_init = cloud_init_for(args.hostname, ssh_key_lines(args.ssh_key), user_data)
            if args.dry_run:
                check_boot(args.boot, args.image)
                alloc = host.plan(request)
                _emit(args, alloc.to_dict(), f"would compose {alloc.name}: {json.dumps(alloc.to_dict())}")
                return 0
            # A path typed at the shell is the operator's own: make it absolute; bare names are looked up
            # in the image directory by the provider, stream names (<os>:<alias>) on the image server.
            path = args.image and "/" in args.image and not is_stream_name(args.image)
            image = os.path.abspath(args.image) if path else args.image
            vm = host.compose(
                request,
                start=args.start,
                boot=args.boot,
                image=image,
                cloud_init=cloud_init,
            )
            _emit(args, vm.to_dict(), f"composed {vm_line(vm.to_dict())}")
        elif args.command == "decompose":
            host.decompose(args.name)
            _emit(args, {"name": args.name, "decomposed": True}, f"decomposed {args.name}")
        elif args.command == "list":
            vms = [v.to_dict() for v in host.vms(pool=args.pool)]
            _emit(args, vms, "\n".join(vm_line(v) for v in vms) or "no VMs")
        elif args.command in ("start", "stop"):
            if args.command == "start":
                host.start(args.name)
                state = host.find(args.name).state
            else:
                state = host.stop(args.name, force=args.force, wait=args.wait)
            _emit(args, {"name": args.name, "state": state}, f"{args.name}: {state}")
        elif args.command == "gc":
            # What gc skipped, and why, goes to stderr; stdout lists what it removed.
            logging.basicConfig(level=logging.INFO, format="vmhost: %(message)s", stream=sys.stderr)
            removed = host.gc()
            _emit(args, {"removed": removed}, "\n".join(f"removed {r}" for r in removed) or "nothing to remove")
        elif args.command == "images":
            _images(args, host)
    finally:
        host.provider.close()
    return 0


def _images(args: argparse.Namespace, host: VmHost) -> None:
    if args.images_command == "list":
        bases = host.images()
        lines = [
            f"{b['pool']}/{b['volume']} {b['image']} {b['version']} {b['state']} used by {len(b['used_by'])}"
            for b in bases
        ]
        _emit(args, bases, "\n".join(lines) or "no base images")
        return
    removed = host.prune_images(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    _emit(
        args,
        {"removed": removed, "dry_run": args.dry_run},
        "\n".join(f"{verb} {r}" for r in removed) or "nothing to prune",
    )


def _hint(e: BaseException) -> str:
    """How to wait longer, when what failed was a time limit (possibly inside a failed compose step)."""
    while e is not None:
        if isinstance(e, HypervisorTimeout):
            return "; if it is only slow, raise --timeout (VMHOST_TIMEOUT)"
        if isinstance(e, HostLockBusy):
            return "; to wait longer, raise --lock-timeout (VMHOST_LOCK_TIMEOUT)"
        e = e.__cause__
    return ""


def serve(args: argparse.Namespace) -> int:
    """Run `vmhost serve` until SIGTERM or Ctrl-C; each read of the host opens and closes its own connection."""
    _policy(args)  # a bad policy option is refused before anything listens

    def read() -> dict:
        host = _host(args)
        try:
            return host.resources()
        finally:
            host.provider.close()

    server = make_server(args.listen, read)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"vmhost: serving {args.backend} resources on http://{args.listen}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.reader.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = args.json or args.json_before
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`vmhost resources | head`): stop quietly, as other commands do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ParseError, PlacementError, ProviderError, ValueError) as e:
        print(f"vmhost: error: {e}{_hint(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a backend library error we did not classify: still one line, no traceback
        print(f"vmhost: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
