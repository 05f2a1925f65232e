"""`vmhost serve` above the provider: the cache and time limit, the metrics, the endpoints, the page."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.page_dom import PageDom
from tests.unit.fakes import FakeProvider
from vmhost import cli
from vmhost.exporter import CachedReader, ExporterServer, Snapshot, metric_families
from vmhost.model import VmInfo, VmRequest
from vmhost.page import render_page
from vmhost.parse import ParseError, format_cpuset, parse_listen_address
from vmhost.service import VmHost


@pytest.fixture
def provider(tmp_path, monkeypatch):
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "lock"))
    p = FakeProvider()
    monkeypatch.setattr(cli, "make_provider", lambda settings: p)
    return p


def pinned_hugepage_vm(host: VmHost, name: str = "web") -> VmInfo:
    req = VmRequest.from_dict(
        {"cores": 2, "memory": "2G", "pinned_cores": "auto", "hugepages_backed": True, "hugepage_size": "2M"}
    )
    return host.compose(replace(req, name=name), start=True)


def samples(snap: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in metric_families(snap):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples_: dict, name: str, **labels: str) -> float:
    return samples_[(name, tuple(sorted(labels.items())))]


def snapshot(host: VmHost, **kw) -> Snapshot:
    return CachedReader(host.resources, **kw).get()


# --- listen address ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [("127.0.0.1:9477", ("127.0.0.1", 9477)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:65535", ("::1", 65535))],
)
def test_listen_address_accepts_ip_port(text, want):
    assert parse_listen_address(text) == want


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("localhost:9477", "not IP:PORT"),
        ("9477", "not IP:PORT"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:70000", "out of range"),
        ("300.1.1.1:9477", "no valid IP"),
        ("[::1]9477", "not IP:PORT"),
        ("x" * 500, "not IP:PORT"),
    ],
)
def test_listen_address_refuses_with_one_sentence(text, needle):
    with pytest.raises(ParseError, match=needle) as e:
        parse_listen_address(text)
    assert len(str(e.value)) < 200


# --- the reader ----------------------------------------------------------------------------------


def test_reader_reuses_a_fresh_snapshot_and_reads_again_when_it_is_stale():
    now = [0.0]
    calls = []
    reader = CachedReader(lambda: calls.append(1) or {"vms": []}, ttl=5, clock=lambda: now[0])
    reader.get()
    now[0] = 4.9
    reader.get()
    assert len(calls) == 1
    now[0] = 5.0
    reader.get()
    assert len(calls) == 2


def test_a_hung_hypervisor_is_reported_down_in_bounded_time_and_costs_one_read():
    release = threading.Event()
    calls = []

    def hung():
        calls.append(1)
        release.wait(10)
        return {"vms": []}

    reader = CachedReader(hung, ttl=0, timeout=0.2)
    t0 = time.monotonic()
    first = reader.get()
    second = reader.get()
    assert time.monotonic() - t0 < 2
    assert first.resources is None and "did not answer within 0.2 s" in first.error
    assert second.resources is None
    assert len(calls) == 1  # the second request waited on the same read instead of piling up another
    release.set()
    time.sleep(0.05)
    assert reader.get().resources == {"vms": []}
    reader.close()


def test_concurrent_scrapes_share_one_read():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return {"vms": []}

    reader = CachedReader(slow, ttl=5, timeout=5)
    threads = [threading.Thread(target=reader.get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_a_failing_read_is_up_0_with_the_reason_and_no_resource_series():
    def broken():
        raise ConnectionRefusedError("Failed to connect socket to '/var/run/libvirt/libvirt-sock'\nmore")

    snap = CachedReader(broken).get()
    got = samples(snap)
    assert value(got, "vmhost_hypervisor_up") == 0
    assert snap.error == "ConnectionRefusedError: Failed to connect socket to '/var/run/libvirt/libvirt-sock'"
    assert {name for name, _ in got} == {"vmhost_hypervisor_up", "vmhost_hypervisor_read_duration_seconds"}


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_move_by_exactly_the_pinned_hugepage_vms_amounts(provider):
    host = VmHost(provider)
    before = samples(snapshot(host))
    vm = pinned_hugepage_vm(host)
    after = samples(snapshot(host))
    node = str(vm.allocation.numa_nodes[0])
    pages = vm.allocation.hugepages.per_node[int(node)]
    assert value(after, "vmhost_hypervisor_up") == 1
    assert value(after, "vmhost_node_pinned_threads", node=node) - value(
        before, "vmhost_node_pinned_threads", node=node
    ) == len(vm.allocation.pinned)
    assert value(before, "vmhost_node_free_threads", node=node) - value(
        after, "vmhost_node_free_threads", node=node
    ) == len(vm.allocation.pinned)
    assert (
        value(before, "vmhost_node_hugepages_free", node=node, size="2M")
        - value(after, "vmhost_node_hugepages_free", node=node, size="2M")
        == pages
        == 1024
    )
    assert value(after, "vmhost_node_hugepages", node=node, size="2M") == 1024
    assert value(after, "vmhost_vms", state="running", origin="ours") == 1
    (info,) = [dict(k[1]) for k in after if k[0] == "vmhost_vm_info"]
    assert info == {
        "vm": "web",
        "state": "running",
        "origin": "ours",
        "phase": "ready",
        "nodes": node,
        "pinned": format_cpuset(vm.allocation.pinned),
    }
    assert value(after, "vmhost_node_threads", node="0") == 8
    assert value(after, "vmhost_storage_pool_bytes", pool="default") == 500 * 10**9
    assert value(after, "vmhost_nic_sriov_vfs", nic="enp65s0f0", node="1") == 4
    assert value(after, "vmhost_cpu_overcommit_ratio") == 1.0


def test_a_foreign_vm_running_on_a_pinned_thread_is_counted_on_its_node(provider):
    host = VmHost(provider)
    vm = pinned_hugepage_vm(host)
    thread = vm.allocation.pinned[0]
    node = str(vm.allocation.numa_nodes[0])
    assert value(samples(snapshot(host)), "vmhost_node_pinned_threads_shared_foreign", node=node) == 0
    alien = replace(vm.allocation, name="alien", hugepages=None, pinned=(thread,), vcpus=1)
    provider.vms["alien"] = VmInfo("alien", "running", alien, managed=False)
    assert value(samples(snapshot(host)), "vmhost_node_pinned_threads_shared_foreign", node=node) == 1
    assert value(samples(snapshot(host)), "vmhost_vms", state="running", origin="foreign") == 1
    html = render_page(snapshot(host))
    assert f'data-shared-thread="{thread}">pinned thread {thread} of web is shared with alien' in html


def test_only_threads_shared_with_foreign_vms_count():
    res = {
        "nodes": [{"id": 0, "pinned": {"2": "web", "3": "web"}}, {"id": 1, "pinned": {}}],
        "vms": [
            {"name": "web", "managed": True, "state": "running"},
            {"name": "x", "managed": False, "state": "running"},
        ],
        "shared_pinned_threads": [{"thread": 2, "pinned_by": "web", "shared_with": ["x"]}],
    }
    from vmhost.exporter import shared_with_foreign

    assert shared_with_foreign(res) == {0: 1, 1: 0}
    res["shared_pinned_threads"][0]["shared_with"] = ["web2"]  # one of ours, floating: not foreign
    assert shared_with_foreign(res) == {0: 0, 1: 0}


def test_an_unfinished_compose_is_a_series_whose_age_grows(provider):
    host = VmHost(provider)
    vm = pinned_hugepage_vm(host)
    provider.vms[vm.name] = replace(vm, phase="composing")
    reader = CachedReader(host.resources, ttl=0)
    first = samples(reader.get())
    time.sleep(0.05)
    second = samples(reader.get())
    key = ("vmhost_vm_unfinished_seconds", (("phase", "composing"), ("vm", "web")))
    assert second[key] > first[key] >= 0
    provider.vms[vm.name] = vm
    assert not [k for k in samples(reader.get()) if k[0] == "vmhost_vm_unfinished_seconds"]


# --- HTTP ----------------------------------------------------------------------------------------


@pytest.fixture
def served(provider):
    host = VmHost(provider)
    server = ExporterServer(("127.0.0.1", 0), CachedReader(host.resources, ttl=0))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield host, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_api_resources_is_what_vmhost_resources_json_prints(served, capsys):
    host, url = served
    pinned_hugepage_vm(host)
    assert cli.main(["resources", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    status, headers, body = get(url + "/api/resources")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == printed


def test_metrics_endpoint_is_prometheus_text(served):
    host, url = served
    pinned_hugepage_vm(host)
    status, headers, body = get(url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"vmhost_node_pinned_threads", "vmhost_node_hugepages_free", "vmhost_hypervisor_up"} <= names
    assert "vmhost_process_resident_memory_bytes" in {
        s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples
    }


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_nothing_changes_anything(served, provider, method):
    host, url = served
    pinned_hugepage_vm(host)
    for path in ("/", "/metrics", "/api/resources"):
        status, _, _ = get(url + path, method)
        assert status == 405
    assert list(provider.vms) == ["web"] and provider.decomposed == []


def test_unknown_paths_are_404(served):
    _, url = served
    assert get(url + "/etc/passwd")[0] == 404


def test_the_page_is_served_with_a_policy_that_fetches_nothing_else(served):
    host, url = served
    pinned_hugepage_vm(host)
    status, headers, body = get(url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"http://" not in body and b"https://" not in body and b"src=" not in body


def test_api_resources_says_503_with_the_reason_when_the_hypervisor_is_down(served, provider):
    _, url = served

    def down():
        raise ConnectionRefusedError("libvirtd is not running")

    provider.discover = down
    status, _, body = get(url + "/api/resources")
    assert status == 503 and "libvirtd is not running" in json.loads(body)["error"]
    assert get(url + "/")[0] == 200


# --- the page ------------------------------------------------------------------------------------


def test_the_page_shows_node_cards_with_bars_matching_the_resources(provider):
    host = VmHost(provider)
    vm = pinned_hugepage_vm(host)
    snap = snapshot(host)
    parsed = PageDom()
    parsed.feed(render_page(snap))
    res = snap.resources
    node = str(vm.allocation.numa_nodes[0])
    assert parsed.vms == {"web": node}
    for n in res["nodes"]:
        bar = parsed.bars[(str(n["id"]), "threads")]
        assert (int(bar["data-pinned"]), int(bar["data-free"]), int(bar["data-total"])) == (
            n["threads"]["pinned"],
            n["threads"]["free"],
            n["threads"]["total"],
        )
        hp = parsed.bars[(str(n["id"]), "hugepages-2M")]
        assert (int(hp["data-used"]), int(hp["data-free"])) == (
            n["hugepages"]["2M"]["used"],
            n["hugepages"]["2M"]["free"],
        )
    assert parsed.bars[(node, "threads")]["data-pinned"] == "2"
    assert parsed.bars[("1", "vfs-enp65s0f0")]["data-total"] == "4"
    assert parsed.bars[(None, "pool-default")]["data-total"] == str(500 * 10**9)


def test_the_page_escapes_names_from_the_hypervisor_and_marks_foreign_vms(provider):
    host = VmHost(provider)
    vm = pinned_hugepage_vm(host)
    evil = '<img src=x onerror="alert(1)">'
    provider.vms[evil] = VmInfo(evil, "running", replace(vm.allocation, name=evil, pinned=None), managed=False)
    html = render_page(snapshot(host))
    assert evil not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    parsed = PageDom()
    parsed.feed(html)
    assert parsed.foreign == [evil]


def test_the_page_says_why_when_the_hypervisor_did_not_answer():
    html = render_page(Snapshot(None, "the hypervisor did not answer within 10 s", 10.0, 0.0))
    assert "the hypervisor did not answer within 10 s" in html and 'class="card' not in html


def test_cli_serve_refuses_a_bad_address_in_one_line(provider, capsys):
    assert cli.main(["serve", "--listen", "localhost:80"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmhost: error: listen address 'localhost:80' is not IP:PORT") and err.count("\n") == 1


def test_connections_beyond_the_limit_are_closed_not_queued(provider):
    import socket

    server = ExporterServer(("127.0.0.1", 0), CachedReader(VmHost(provider).resources), max_clients=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = server.server_address
    try:
        idle = socket.create_connection(address, timeout=5)  # holds the one slot, sends nothing
        time.sleep(0.2)
        extra = socket.create_connection(address, timeout=5)
        extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert extra.recv(100) == b""  # closed without an answer
        idle.close()
        time.sleep(0.2)
        status, _, body = get(f"http://127.0.0.1:{address[1]}/metrics")
        assert status == 200 and b"vmhost_hypervisor_up 1.0" in body  # the slot came back
    finally:
        server.shutdown()
        server.server_close()
