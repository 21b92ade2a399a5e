# hyperrec: the two commands a user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := proto/hyperrec/v1/recommender.proto proto/hyperrec/v1/profiles.proto proto/hyperrec/v1/admin.proto
GEN_DIR := hyperrec/v1

.PHONY: demo test bench pressure scale install lint proto proto-check buf-lint pytest dockerfile-lint k8s-lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hyperrec needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q -e '.[train,loadtest,tracing,dev]'
	@touch $@

install: $(STAMP)

## demo: train a small synthetic model, publish it, serve it on localhost:50051 with the embedded profile store
demo: $(STAMP)
	$(BIN)/hyperrec demo

## test: lint, check generated code, run the whole test suite (needs redis-server on PATH)
test: $(STAMP) lint proto-check pytest

## bench: the server against its in-process and gRPC echo floors at 1M items, then a capacity search (minutes)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench --out benchmarks/results

## pressure: server CPU per call against the in-process floor, --workers 1 against the default (A/B), an overload
## burst at 5x saturation (minutes; needs redis-server)
pressure: $(STAMP)
	$(BIN)/python -m benchmarks.pressure --out benchmarks/results

## scale: retrieval latency, memory and recall across catalogue sizes and index types (tens of minutes)
scale: $(STAMP)
	$(BIN)/python -m benchmarks.scale --out benchmarks/results --plot docs/images/scale-curve.png

pytest: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP) buf-lint dockerfile-lint k8s-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

buf-lint: $(STAMP)
	$(BIN)/buf lint proto

dockerfile-lint: $(STAMP)
	$(BIN)/hadolint Dockerfile

## k8s-lint: validate the Kubernetes manifests offline against the schemas kubernetes-validate bundles, strictly
## (unknown fields are errors). A manifest whose kind has no schema only warns there, so any WARN fails here too;
## kustomization.yaml (not a cluster resource) is skipped. `make k8s-lint K8S_DIR=dir` checks another folder.
K8S_VERSION := 1.33.0
K8S_DIR := deploy/k8s
k8s-lint: $(STAMP)
	@files="$(filter-out %/kustomization.yaml,$(wildcard $(K8S_DIR)/*.yaml))"; \
	[ -n "$$files" ] || { echo "k8s-lint: no manifests in $(K8S_DIR)"; exit 1; }; \
	out=$$($(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) $$files 2>&1); rc=$$?; \
	[ -z "$$out" ] || echo "$$out"; \
	if [ $$rc -ne 0 ] || grep -q '^WARN' <<< "$$out"; then echo "k8s-lint: failed"; exit 1; fi; \
	echo "k8s-lint: $$(wc -w <<< "$$files") manifests valid against Kubernetes $(K8S_VERSION)"

## proto: regenerate Python stubs and .pyi type stubs from the contract
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto \
	  --python_out=. --grpc_python_out=. \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. \
	  $(PROTO_SRC)

## proto-check: fail when the committed stubs differ from what `make proto` generates
proto-check: $(STAMP)
	@tmp=$$(mktemp -d); \
	$(BIN)/python -m grpc_tools.protoc -I proto \
	  --python_out=$$tmp --grpc_python_out=$$tmp \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$$tmp \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$$tmp \
	  $(PROTO_SRC) && \
	for f in $$(cd $$tmp && find . -type f); do \
	  cmp -s $$tmp/$$f $$f || { echo "stale generated file $$f: run 'make proto' and commit"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated stubs are up to date"

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
