# tradingstack: `make up` brings the platform up on kind, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A real kube-apiserver for the operator's tests (see ../shared/envtest/README.md).
TRADINGSTACK_ENVTEST ?= $(abspath ../shared/envtest)
export TRADINGSTACK_ENVTEST
# A real single-node cluster (kubelet, containerd) for the end-to-end test (see ../shared/cluster/README.md).
TRADINGSTACK_CLUSTER_KIT ?= $(abspath ../shared/cluster)
export TRADINGSTACK_CLUSTER_KIT

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install
install: $(VENV)/.installed ## create .venv with the project and its dev tools

.PHONY: deps
deps: ## install the servers the tests use (etcd for envtest), where missing
	hack/test-deps.sh

.PHONY: lint
lint: install ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: crd
crd: install ## regenerate crds/ from the pydantic model
	$(VENV)/bin/tradingstack crd > crds/tradingstack.io_tradingstacks.yaml

.PHONY: manifests
manifests: install ## regenerate manifests/install.yaml from the chart
	$(PY) hack/render_manifests.py

.PHONY: test
test: install deps lint ## everything: lint, types, unit and envtest tests (pytest exit 5, no tests, fails)
	$(PY) -m pytest

.PHONY: bench
bench: install deps ## benchmarks against floors measured in the same run (bench/results.json)
	$(PY) -m bench $(BENCH_ARGS)

.PHONY: chaos
chaos: install deps ## the fault-injection suite, long: every fault TRADINGSTACK_CHAOS_ROUNDS times (5), tables printed
	TRADINGSTACK_CHAOS_ROUNDS=$${TRADINGSTACK_CHAOS_ROUNDS:-5} $(PY) -m pytest -s -p no:logging tests/test_chaos.py

.PHONY: up
up: ## kind cluster + image + helm install + sample TradingStack, then wait for Ready
	hack/up.sh

.PHONY: down
down: ## delete the kind cluster
	hack/down.sh
