# dynamo-snapshot developer entry points. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup k8s helm minio node run test test-unit lint bench stop clean e2e docker-engine

# Images: agent-image, operator-image, placeholder-image (RUNTIME_IMAGE=..., CRIU_REPO=..., CRIU_REF=...), images
include images/Makefile.inc

.venv/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,devcluster]'
	touch $@

# The local control plane binaries (built from the Go module proxy, cached in ~/.cache/dynamo-snapshot).
k8s:
	hack/build-k8s.sh >/dev/null

# A real helm binary for the chart tests (built from the Go module proxy, cached).
helm:
	hack/build-helm.sh >/dev/null

# A real MinIO (S3 server) for the object-storage tests (built from the Go module proxy, cached; ~5 min cold).
minio:
	hack/build-minio.sh >/dev/null

# containerd, runc and CRIU for the node tests (needs root; skipped with a note otherwise).
node:
	@if [ "$$(id -u)" = 0 ]; then hack/ci/containers.sh; else echo "not root: skipping containerd/CRIU setup (their tests will skip)"; fi

setup: $(BIN)/.installed k8s helm minio

run: setup node
	$(BIN)/dynamo-snapshot demo

test: setup node
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: $(BIN)/.installed
	$(BIN)/pytest -m "not integration and not containers and not e2e and not gpu" $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check dynamo_snapshot tests bench images

bench: setup
	$(BIN)/pip install -q -e '.[test,dev,bench]'
	$(BIN)/python bench/informer.py

# Checkpoint + restore in a kind cluster, everything built offline (needs root and a Docker engine;
# says so and exits 0 without one). `make docker-engine` starts one that leaves iptables alone.
e2e: setup
	hack/kind/e2e.sh

docker-engine:
	hack/kind/docker-engine.sh start

stop:
	-$(BIN)/python -m dynamo_snapshot.devcluster.pids stop .local/cluster
	-$(BIN)/python -m dynamo_snapshot.devcluster.node clean .local/cluster

clean:
	rm -rf .local build dist *.egg-info
