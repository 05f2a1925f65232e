"""Builders for the relation tests: requests, relations and VMs as plain values (no ops), and a fake
provider whose VMs take addresses, a login user and host keys as a hypervisor reports them."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.fakes import FakeProvider
from tests.unit.ssh_keys import ED25519, host_key
from vmhost.model import DEFAULT_LOGIN_USER, Allocation, HostKey, VmInfo
from vmhost.relation_policy import IncomingRequest, RelationRequests, RelationSettings, judge_requests

M = "aaaaaaaa-1111-4111-8111-000000000001"
GiB = 1024**3


def spec(id: str, **kw) -> IncomingRequest:
    """A well-formed request of 1 core and 1 GiB unless `kw` says otherwise."""
    return IncomingRequest(id, {"id": id, "cores": 1, "memory": GiB, **kw})


def rel(*requests: IncomingRequest, app="client", rid=1, model=M, error=None) -> RelationRequests:
    return RelationRequests(rid, model, app, tuple(requests), error)


def vm(name: str, owner: str | None, cores=1, memory=GiB, nics=(), **kw) -> VmInfo:
    """A running VM; `kw` sets VmInfo's other fields (addresses, login_user, host_keys, state, phase)."""
    kw.setdefault("state", "running")
    return VmInfo(name=name, allocation=Allocation(name, cores, memory, owner=owner, nics=nics), **kw)


def judge(relations, settings=None, held=None):
    """judge_requests with the defaults the tests mostly want."""
    return judge_requests(relations, settings=settings or RelationSettings(), held=held or {})


class DhcpProvider(FakeProvider):
    """A FakeProvider whose VMs read back as a hypervisor reports them: static addresses at once, a DHCP
    lease at once too unless `dhcp` is False (then only after lease()), the login user a seed makes,
    and the VM's public host key (its private half stays with the seed)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dhcp = True
        self.host_keys: tuple[HostKey, ...] = (host_key(ED25519),)

    def compose(self, plan):
        vm = super().compose(plan)
        addresses = tuple(nic.ip for nic in plan.allocation.nics if nic.ip)
        if self.dhcp and not addresses:
            addresses = (f"10.20.0.{100 + len(self.composed)}",)
        seeded = plan.cloud_init is not None
        vm = replace(
            vm,
            addresses=addresses,
            login_user=DEFAULT_LOGIN_USER if seeded else None,
            host_keys=self.host_keys if seeded else (),
        )
        self.vms[vm.name] = vm
        return vm

    def lease(self, name: str, *addresses: str) -> None:
        """The VM took (or lost, or changed) its DHCP address."""
        self.vms[name] = replace(self.vms[name], addresses=addresses)
