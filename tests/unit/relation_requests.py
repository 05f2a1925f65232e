"""Builders for the pure relation tests: requests, relations and VMs as plain values (no ops)."""

from __future__ import annotations

from vmhost.model import Allocation, VmInfo
from vmhost.relation_policy import IncomingRequest, RelationRequests, RelationSettings, judge_requests

M = "aaaaaaaa-1111-4111-8111-000000000001"
GiB = 1024**3


def spec(id: str, **kw) -> IncomingRequest:
    """A well-formed request of 1 core and 1 GiB unless `kw` says otherwise."""
    return IncomingRequest(id, {"id": id, "cores": 1, "memory": GiB, **kw})


def rel(*requests: IncomingRequest, app="client", rid=1, model=M, error=None) -> RelationRequests:
    return RelationRequests(rid, model, app, tuple(requests), error)


def vm(name: str, owner: str | None, cores=1, memory=GiB, nics=()) -> VmInfo:
    return VmInfo(name=name, state="running", allocation=Allocation(name, cores, memory, owner=owner, nics=nics))


def judge(relations, settings=None, held=None):
    """judge_requests with the defaults the tests mostly want."""
    return judge_requests(relations, settings=settings or RelationSettings(), held=held or {})
