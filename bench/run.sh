#!/usr/bin/env bash
# `make bench`: placement vs Nova, packing (fill-only and churn, vs Nova and an exact packer), compose cost
# vs the bare hypervisor, scaling.
# Prints one markdown report on stdout; JSON and PNG go to bench/results/. Progress goes to stderr.
# Knobs (env): BENCH_REPS (ours, per shape; 300), BENCH_NOVA_REPS (100), BENCH_NOVA_LIMIT (s per Nova call; 30),
# BENCH_BUDGET (s per shape; 3), BENCH_RUNS (compose/scaling runs; 5), BENCH_SKIP_HYPERVISOR=1 (placement only),
# BENCH_EXACT_SECONDS (CP-SAT time per fill-only seed; 8).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
NOVA_VENV=bench/.nova-venv
NOVA_PY=$NOVA_VENV/bin/python
RES=bench/results
REQ=bench/requirements-nova.txt
export PYTHONWARNINGS=ignore   # Nova's eventlet deprecation notices are not results
mkdir -p "$RES"
t0=$SECONDS

if [ ! -x "$NOVA_PY" ] || ! cmp -s "$REQ" "$NOVA_VENV/.requirements"; then
    echo "== building the Nova venv ($NOVA_VENV)" >&2
    /usr/bin/env python3 -m venv "$NOVA_VENV"
    "$NOVA_PY" -m pip install -q --upgrade pip
    "$NOVA_PY" -m pip install -q -r "$REQ"
    cp "$REQ" "$NOVA_VENV/.requirements"
fi

EXACT_REQ=bench/requirements-exact.txt
if ! cmp -s "$EXACT_REQ" "$NOVA_VENV/.requirements-exact"; then
    echo "== installing the exact packer (ortools) into $NOVA_VENV" >&2
    if "$NOVA_PY" -m pip install -q -r "$EXACT_REQ"; then
        cp "$EXACT_REQ" "$NOVA_VENV/.requirements-exact"
    else
        echo "== ortools could not be installed: the packing section runs without the exact packer" >&2
    fi
fi

# Byte-compile once: with PYTHONDONTWRITEBYTECODE set (as on these machines) every `vmhost` run would
# otherwise recompile the package, a cost an installed wheel never pays.
"$PY" -m compileall -q src lib >/dev/null

echo "== placement latency: cases (hosts, residents placed by our engine, requests)" >&2
"$PY" bench/placement_bench.py gen
echo "== placement latency: vmhost" >&2
"$PY" bench/placement_bench.py run --reps "${BENCH_REPS:-300}" --budget "${BENCH_BUDGET:-3}"
echo "== placement latency: Nova (limit ${BENCH_NOVA_LIMIT:-30} s per call)" >&2
"$NOVA_PY" bench/nova_runner.py latency --reps "${BENCH_NOVA_REPS:-100}" --budget "${BENCH_BUDGET:-3}" \
    --limit "${BENCH_NOVA_LIMIT:-30}"
echo "== packing: fill-only and churn streams, 20 seeds each" >&2
"$PY" bench/packing.py
"$NOVA_PY" bench/nova_runner.py packing --limit "${BENCH_NOVA_LIMIT:-30}"
echo "== packing: offline exact packer (CP-SAT, ${BENCH_EXACT_SECONDS:-8} s per seed; optional)" >&2
"$NOVA_PY" bench/exact_packer.py --seconds "${BENCH_EXACT_SECONDS:-8}"

if [ "${BENCH_SKIP_HYPERVISOR:-0}" = 1 ]; then
    echo "== compose/scaling skipped: BENCH_SKIP_HYPERVISOR=1" >&2
    rm -f "$RES/compose.json" "$RES/scaling.json"
elif ! virsh -q -c qemu:///system uri >/dev/null 2>&1; then
    reason="libvirtd does not answer on qemu:///system (start it with scripts/host-setup.sh)"
    echo "== compose/scaling skipped: $reason" >&2
    printf '{"runs": 0, "libvirt": {"skipped": "%s"}, "lxd": {"skipped": "%s"}}\n' "$reason" "$reason" >"$RES/compose.json"
    printf '{"skipped": "%s"}\n' "$reason" >"$RES/scaling.json"
else
    echo "== compose cost vs raw hypervisor" >&2
    "$PY" bench/compose_bench.py --runs "${BENCH_RUNS:-5}"
    echo "== scaling: resources/list with 1, 50, 200 VMs" >&2
    "$PY" bench/scaling_bench.py --reps "${BENCH_RUNS:-5}"
fi

"$NOVA_PY" bench/report.py
echo "== bench done in $((SECONDS - t0)) s; results in $RES/" >&2
