# vm-host: `make run` (the main job on this machine) and `make test` (every tier this machine can run).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  ?= /var/cache/vmhost
CHARM  := vm-host_amd64.charm
PYTEST_ARGS ?=
# charmcraft and uv from PyPI, in a venv cached outside the repository (scripts/tools-venv.sh).
TOOLS   = $(shell VMHOST_CACHE=$(CACHE) bash scripts/tools-venv.sh)
UV      = $(TOOLS)/bin/uv

.PHONY: host tools venv lock charm run test unit functional cloud-image numa numa-guest package integration lint format bench clean

host:                         ## system packages, hugepages, hugetlbfs, libvirtd, test LXD daemon
	bash scripts/host-setup.sh --lxd

tools:
	@echo $(TOOLS)

# uv.lock is the one pinned set of versions: the packed charm (charmcraft's uv plugin), this venv and CI.
$(STAMP): pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) UV_PYTHON=/usr/bin/python3 $(UV) sync --frozen --extra charm --group dev
	$(PY) -m compileall -q src lib >/dev/null
	touch $(STAMP)

venv: host $(STAMP)           ## libvirt-python builds against libvirt-dev, so host comes first

lock:                         ## re-resolve uv.lock after changing pyproject.toml's dependencies
	$(UV) lock

charm:                        ## vm-host_amd64.charm with charmcraft's own pack (scripts/pack-charm.py)
	$(TOOLS)/bin/python scripts/pack-charm.py . $(CACHE)/charm-build/vm-host .

run: venv                     ## compose a pinned hugepage VM, show resources, decompose it
	bash scripts/demo.sh

test: venv lint charm         ## unit + package + functional (real libvirtd and LXD) + numa (nested multi-node hosts) + integration (skips without juju)
	# numa first: its nested TCG guests are the most timing-sensitive tier, and twice met a dead guest
	# only when they ran after the functional tier's own TCG boot (alone they passed); unit last.
	CHARM_PATH=$(CURDIR)/$(CHARM) $(VENV)/bin/pytest $(PYTEST_ARGS) tests/numa tests/package tests/functional tests/integration tests/unit

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

package: $(STAMP) charm
	CHARM_PATH=$(CURDIR)/$(CHARM) $(VENV)/bin/pytest tests/package

functional: venv
	$(VENV)/bin/pytest tests/functional

cloud-image:                  ## the boot test's Debian cloud image (cached under $(CACHE)/cloud-image); prints its path
	VMHOST_CACHE=$(CACHE) bash scripts/build-cloud-image.sh

numa-guest:                   ## the numa tier's nested guest image and QEMU 10 chroot (cached under $(CACHE)/numa-guest)
	VMHOST_CACHE=$(CACHE) bash scripts/build-numa-guest.sh

numa: venv                    ## 2-node, 4-node and SR-IOV (igb) libvirt hosts nested under TCG, driven over qemu+ssh
	$(VENV)/bin/pytest tests/numa

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
	rm -rf $(VENV) .pytest_cache .ruff_cache $(CHARM)
