"""`vmhost serve` on the real libvirtd, watched by the real tools: Prometheus, promtool, headless Chromium.

Run under the functional flock like the rest of this tier: the VMs here are composed on the shared daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from tests.page_dom import PageDom

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmhost.model import VmRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "src/prometheus_alert_rules/vmhost.rules"
RULE_TESTS = sorted((ROOT / "tests/alert_rules").glob("*.yaml"))
DASHBOARD = ROOT / "src/grafana_dashboards/vm-host.json"
URI = "qemu:///system"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/host-setup.sh installs it from Debian)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _wait(what: str, check, timeout: float = 60, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # not there yet
            last = e
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last})")


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, **kw):
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def serve(host, tmp_path):
    """A real `vmhost serve` process on the libvirt backend; yields its base URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vmhost.cli", "serve", "--backend", "libvirt", "--listen", f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'lib'}"}
    with _process(cmd, tmp_path / "serve.log", env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait(
            "vmhost serve answers",
            lambda: proc.poll() is None and b"vmhost_hypervisor_up 1.0" in _get(url + "/metrics"),
        )
        yield url


def _compose_pinned_hugepage_vm(host) -> dict:
    vmhost, made = host
    res = vmhost.resources()
    if not any(n["threads"]["free"] for n in res["nodes"]):
        pytest.skip("every thread on this host is pinned by other VMs")
    name = f"obs-{uuid.uuid4().hex[:6]}"
    made.append(name)
    request = VmRequest.from_dict(
        {"cores": 1, "memory": "128M", "pinned_cores": "auto", "hugepages_backed": True, "hugepage_size": "2M"}
    )
    vm = vmhost.compose(replace(request, name=name), start=True)
    return vm.to_dict()


# --- Prometheus ----------------------------------------------------------------------------------


@pytest.fixture
def prometheus(serve, tmp_path):
    """A real Prometheus on 127.0.0.1 scraping `vmhost serve` every second; yields a query function."""
    binary = _tool("prometheus")
    port = _free_port()
    target = urllib.parse.urlparse(serve).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{RULES}]\n"
        f"scrape_configs: [{{job_name: vmhost, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with _process(cmd, tmp_path / "prometheus.log"):
        api = f"http://127.0.0.1:{port}/api/v1"

        def query(expr: str) -> dict[str, float]:
            """Instant query -> {node label or '': value}."""
            body = json.loads(_get(f"{api}/query?" + urllib.parse.urlencode({"query": expr})))
            assert body["status"] == "success", body
            return {r["metric"].get("node", ""): float(r["value"][1]) for r in body["data"]["result"]}

        def query_range(expr: str, start: float, end: float) -> list[float]:
            qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
            body = json.loads(_get(f"{api}/query_range?{qs}"))
            assert body["status"] == "success", body
            return [float(v) for r in body["data"]["result"] for _, v in r["values"]]

        _wait("Prometheus has scraped vmhost serve", lambda: query("vmhost_hypervisor_up") == {"": 1.0})
        query.range = query_range  # type: ignore[attr-defined]
        yield query


def test_prometheus_sees_pinned_threads_and_free_hugepages_move_by_exactly_the_vms_amounts(host, prometheus):
    query = prometheus
    vmhost, _ = host
    pinned_before = query("vmhost_node_pinned_threads")
    free_before = query('vmhost_node_hugepages_free{size="2M"}')
    t0 = time.time()
    vm = _compose_pinned_hugepage_vm(host)
    node = str(vm["numa_nodes"][0])
    assert len(vm["pinned"]) == 1 and vm["hugepages"] == {"size": "2M", "per_node": {node: 64}}

    want_pinned = {**pinned_before, node: pinned_before[node] + 1}
    want_free = {**free_before, node: free_before[node] - 64}
    _wait("the composed VM in Prometheus", lambda: query("vmhost_node_pinned_threads") == want_pinned, 30)
    assert _wait("its pages in Prometheus", lambda: query('vmhost_node_hugepages_free{size="2M"}') == want_free, 30)

    vmhost.decompose(vm["name"])
    _wait("the decomposed VM gone from Prometheus", lambda: query("vmhost_node_pinned_threads") == pinned_before, 30)
    _wait("its pages back in Prometheus", lambda: query('vmhost_node_hugepages_free{size="2M"}') == free_before, 30)
    t2 = time.time()
    # Every scrape over the whole run saw one of exactly two values: before, or before moved by the VM.
    assert set(query.range(f'vmhost_node_pinned_threads{{node="{node}"}}', t0, t2)) == {  # type: ignore[attr-defined]
        pinned_before[node],
        pinned_before[node] + 1,
    }
    assert set(query.range(f'vmhost_node_hugepages_free{{node="{node}",size="2M"}}', t0, t2)) == {  # type: ignore[attr-defined]
        free_before[node],
        free_before[node] - 64,
    }


# --- alert rules ---------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    r = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout


ALERTS = ("VmHostHugepagesLow", "VmHostNoFreePinnableThreads", "VmHostVmStuckComposing", "VmHostHypervisorDown",
          "VmHostForeignVmOnPinnedThread")  # fmt: skip


def test_every_alert_has_a_promtool_test_file():
    tested = {a for f in RULE_TESTS for a in re.findall(r"alertname: (\w+)", f.read_text())}
    defined = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    assert defined == tested == set(ALERTS)


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.stem)
def test_alert_fires_on_bad_series_and_stays_quiet_on_good(test_file, tmp_path):
    promtool = _tool("promtool")
    r = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # The same test against rules whose alert never fires must fail: the test file really exercises the alert.
    alert = re.search(r"alertname: (\w+)", test_file.read_text()).group(1)
    broken = re.sub(
        rf"(- alert: {alert}\n(?:.*\n)*?\s+expr: ).*",
        r"\1vector(1) == 0",
        RULES.read_text(),
        count=1,
    )
    assert broken != RULES.read_text()
    (tmp_path / "src/prometheus_alert_rules").mkdir(parents=True)
    (tmp_path / "src/prometheus_alert_rules/vmhost.rules").write_text(broken)
    (tmp_path / "tests/alert_rules").mkdir(parents=True)
    shutil.copy(test_file, tmp_path / "tests/alert_rules" / test_file.name)
    r = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "tests/alert_rules" / test_file.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0, f"{test_file.name} passes even when {alert} never fires"


# --- dashboard and rules use only served metrics ---------------------------------------------------

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, grouping labels, strings and functions removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end() :].lstrip()
        if rest.startswith("(") or m.group() in _PROMQL_WORDS or m.group().startswith("$"):
            continue
        names.add(m.group())
    return names


def test_metric_names_reads_what_promql_reads():
    assert metric_names('sum by (instance, size) (vmhost_a{x="b"}) / vmhost_b[5m] > bool 0.1') == {
        "vmhost_a",
        "vmhost_b",
    }


def _served_names(url: str) -> set[str]:
    """Every metric a real scrape declares (HELP/TYPE, with or without samples on this host) or samples."""
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(_get(url + "/metrics").decode()))
    return {f.name for f in families} | {s.name for f in families for s in f.samples}


def test_dashboard_is_well_formed_and_queries_only_metrics_the_exporter_serves(host, serve):
    vm = _compose_pinned_hugepage_vm(host)  # so that per-VM series are served too
    _wait("the VM in a scrape", lambda: vm["name"].encode() in _get(serve + "/metrics"), 15)
    served = _served_names(serve)
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["prometheusds"]["type"] == "datasource" and variables["prometheusds"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]  # across hosts and per host
    exprs = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${prometheusds}", panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${prometheusds}", panel["title"]
            exprs.append(t["expr"])
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= served, f"not served: {sorted(used - served)}"
    for must in (
        "vmhost_node_pinned_threads",
        "vmhost_node_hugepages_free",
        "vmhost_vm_info",
        "vmhost_storage_pool_bytes",
    ):
        assert must in used
    rule_exprs = re.findall(r"expr: (.*)", RULES.read_text())
    assert set().union(*(metric_names(e) for e in rule_exprs)) <= served


# --- the page in a real browser -------------------------------------------------------------------


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        _tool("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / f'chromium-{uuid.uuid4().hex[:8]}'}",  # a new profile per run
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_chromium_shows_the_pinned_hugepage_vm_on_its_node_card(host, serve, tmp_path):
    vm = _compose_pinned_hugepage_vm(host)
    node = str(vm["numa_nodes"][0])
    _wait("the VM on the page", lambda: vm["name"].encode() in _get(serve + "/"), 15)
    r = _chromium(tmp_path, "--virtual-time-budget=2000", "--dump-dom", serve + "/")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(_get(serve + "/api/resources"))
    dom = PageDom()
    dom.feed(r.stdout)
    assert dom.cards == [str(n["id"]) for n in res["nodes"]]
    assert dom.vms[vm["name"]] == node
    for n in res["nodes"]:
        bar = dom.bars[(str(n["id"]), "threads")]
        t = n["threads"]
        assert [int(bar[k]) for k in ("data-pinned", "data-reserved", "data-free", "data-total")] == [
            t["pinned"],
            t["reserved"],
            t["free"],
            t["total"],
        ]
        hp = dom.bars[(str(n["id"]), "hugepages-2M")]
        assert [int(hp["data-used"]), int(hp["data-free"])] == [
            n["hugepages"]["2M"]["used"],
            n["hugepages"]["2M"]["free"],
        ]
    assert int(dom.bars[(node, "threads")]["data-pinned"]) >= 1
    for p in res["storage_pools"]:
        assert int(dom.bars[(None, f"pool-{p['name']}")]["data-total"]) == max(p["total"], p["used"])
    shot = tmp_path / "host-page.png"
    r = _chromium(tmp_path, "--window-size=980,340", "--virtual-time-budget=2000", f"--screenshot={shot}", serve + "/")
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("VMHOST_SCREENSHOT_DIR"):  # how docs/host-page.png is made
        shutil.copy(shot, Path(os.environ["VMHOST_SCREENSHOT_DIR"]) / "host-page.png")


def test_the_page_refreshes_itself_and_reads_without_javascript(host, tmp_path):
    """The inline script fetches the page again and swaps the cards in: a VM composed after the page loaded
    appears without a reload. With JavaScript off the page shows the same cards, read once."""
    import threading

    from vmhost.exporter import CachedReader, ExporterServer

    vmhost, _ = host
    second_read, composed = threading.Event(), threading.Event()
    reads = []

    def read() -> dict:
        reads.append(time.monotonic())
        if len(reads) == 2:  # the page's own refresh: hold it until the VM exists
            second_read.set()
            composed.wait(120)
        return vmhost.resources()

    server = ExporterServer(("127.0.0.1", 0), CachedReader(read, ttl=0, timeout=150))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        result: dict = {}
        browser = threading.Thread(
            target=lambda: result.update(r=_chromium(tmp_path, "--virtual-time-budget=8000", "--dump-dom", url))
        )
        browser.start()
        assert second_read.wait(120), "the page never fetched itself again"
        vm = _compose_pinned_hugepage_vm(host)
        composed.set()
        browser.join(150)
        r = result["r"]
        assert r.returncode == 0, r.stderr[-2000:]
        dom = PageDom()
        dom.feed(r.stdout)
        assert dom.vms.get(vm["name"]) == str(vm["numa_nodes"][0]), "the refreshed cards do not show the new VM"

        # Without JavaScript a browser shows the HTML as served (chromium's --dump-dom itself needs scripts):
        raw = _get(url).decode()
        dom = PageDom()
        dom.feed(raw)
        assert dom.cards and vm["name"] in dom.vms and "<noscript>" in raw and "JavaScript is off" in raw
    finally:
        composed.set()
        server.shutdown()
        server.server_close()


def test_a_compose_killed_half_way_is_served_as_unfinished_until_gc(host, serve, tmp_path):
    """A compose that died after defining its domain (the test-only fault point) is a composing VM whose age
    grows in /metrics and is marked on the page; gc removes it and the series goes."""
    from prometheus_client.parser import text_string_to_metric_families

    from vmhost.providers.base import FAULT_ENV, FAULT_EXIT

    vmhost, made = host
    if not any(n["threads"]["free"] for n in vmhost.resources()["nodes"]):
        pytest.skip("every thread on this host is pinned by other VMs")
    name = f"obs-{uuid.uuid4().hex[:6]}"
    made.append(name)
    env = {**os.environ, FAULT_ENV: "kill-at:start domain", "PYTHONPATH": str(ROOT / "src")}
    env.pop("JUJU_UNIT_NAME", None)
    env["VMHOST_LOCK_FILE"] = str(tmp_path / "lock")
    cmd = [sys.executable, "-m", "vmhost.cli", "compose", "--backend", "libvirt", "--cores", "1", "--memory", "128M",
           "--pinned-cores", "auto", "--hugepages-backed", "--start", "--hostname", name]  # fmt: skip
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == FAULT_EXIT

    def unfinished() -> dict[tuple[str, str], float]:
        families = text_string_to_metric_families(_get(serve + "/metrics").decode())
        return {
            (s.labels["vm"], s.labels["phase"]): s.value
            for f in families
            for s in f.samples
            if s.name == "vmhost_vm_unfinished_seconds"
        }

    _wait("the unfinished VM in /metrics", lambda: (name, "composing") in unfinished(), 15)
    first = unfinished()[(name, "composing")]
    _wait("its age growing", lambda: unfinished()[(name, "composing")] > first, 15)
    page = _get(serve + "/").decode()
    assert f'data-vm="{name}"' in page and '<span class="phase">composing</span>' in page

    assert name in vmhost.gc()
    _wait("the series gone after gc", lambda: (name, "composing") not in unfinished(), 15)
