# vm-host: `make run` (the main job on this machine) and `make test` (every tier this machine can run).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: host venv run test unit functional integration lint format bench clean

host:                         ## system packages, hugepages, hugetlbfs, libvirtd, test LXD daemon
	bash scripts/host-setup.sh --lxd

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(PY) -m compileall -q src lib >/dev/null
	touch $(STAMP)

venv: host $(STAMP)           ## libvirt-python builds against libvirt-dev, so host comes first

run: venv                     ## compose a pinned hugepage VM, show resources, decompose it
	bash scripts/demo.sh

test: venv lint               ## unit + functional (real libvirtd and LXD) + integration (skips without juju)
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

functional: venv
	$(VENV)/bin/pytest tests/functional

integration: $(STAMP)
	$(VENV)/bin/pytest tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv                   ## medians and ratios: placement vs Nova, compose vs raw hypervisor
	bash bench/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
