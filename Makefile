# One entry point for people and CI. `make run` sets up and runs local mode (the main job);
# `make test` runs every gate and every test tier (what .ci/run calls).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run plan test lint unit mutation mutation-check mutation-glue kube-binaries tools browser engine pods-node bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

## run: set up and run local mode on the seed scenario (mock backends), serving on $(BIND)
## (default 127.0.0.1:8080; e.g. `make run BIND=127.0.0.1:9090`, or BIND=127.0.0.1:0 for any free port)
BIND ?= 127.0.0.1:8080
run: setup
	$(BIN)/ibc local --config examples/local.yaml --bind $(BIND)

## plan: the what-if planner on the seed scenario (exits 1: model-b does not fit beside model-a)
plan: setup
	-$(BIN)/ibc plan --cluster-state examples/seed-scenario.yaml --scale default/model-b=1

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## kube-binaries: build (or reuse from ~/.cache/ibc/kube) etcd and the Kubernetes control plane
kube-binaries:
	@if command -v go >/dev/null 2>&1; then bash tests/cluster/build-kube.sh; \
	else echo "go not found: the cluster tier will be skipped (install Go 1.26 to run it)"; fi

## engine: build (or reuse from ~/.cache/ibc/engine) llama.cpp's OpenAI server for the engine tier
engine:
	@rc=0; bash tests/engine/build-engine.sh >/dev/null || rc=$$?; \
	if [ $$rc -eq 3 ] && [ "$${CI:-}" != "true" ]; then rc=0; fi; exit $$rc  # 3: no compiler (it said so)

tools: setup
	@if [ -x deploy/tools/install.sh ]; then bash deploy/tools/install.sh; fi

## browser: Debian's chromium and chromium-driver for the status page's browser test (quick when present)
browser:
	bash tests/browser/install-chromium.sh

## pods-node: the pods profile's real node: Debian packages, kubelet/kube-proxy/containerd, images (cached)
pods-node: setup kube-binaries tools
	@bash tests/pods/prepare.sh

## mutation: mutmut over budget/ against the unit tier; fails on a surviving mutant not listed as equivalent
mutation: setup
	$(BIN)/python .ci/mutation.py --force

## mutation-check: the same, skipped with one line when budget/ is unchanged since the last passing run
## (always run in a fresh clone: the record is in the checkout, .mutation_cache/); part of `make test`, after
## `tools` (the unit tier runs helm and kustomize). Capped at MUTATION_CAP seconds: a run cut by the cap fails and says how many mutants
## it did not run (IBC_MUTATION_TIMEOUT_SECONDS overrides it; docs/testing.md has the measured times)
MUTATION_CAP ?= 3600
mutation-check: setup tools
	IBC_MUTATION_TIMEOUT_SECONDS=$${IBC_MUTATION_TIMEOUT_SECONDS:-$(MUTATION_CAP)} $(BIN)/python .ci/mutation.py

## mutation-glue: the same over the request path's decision glue (webhook, proxy cold path, local scaler, extender)
mutation-glue: setup
	$(BIN)/python .ci/mutation.py --glue

## test: every gate and every tier: lint, the mutation check of budget/, unit, integration (with the browser
## test), cluster, engine, pods (and stress, bounded)
test: lint kube-binaries tools mutation-check browser engine pods-node
	$(BIN)/python -m pytest -m "unit or integration or cluster or stress or engine or pods" -p no:cacheprovider; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; case "$${CI:-}" in 1|true|TRUE|True|yes) ;; *) rc=0;; esac; fi; \
	exit $$rc

unit: setup
	$(BIN)/python -m pytest -m unit -q

## wrk (bench/tools/install-wrk.sh: unpacked from its Debian package into ~/.cache/ibc/tools, cached) measures
## throughput; without it proxy_bench.py falls back to a slower Python client.
bench: setup
	PATH="$$(bash bench/tools/install-wrk.sh | tail -n 1):$$PATH" $(BIN)/ibc bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
