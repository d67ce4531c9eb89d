# The two commands a new user needs:  `make run`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run up stop status test test-unit lint format install lock clean bench-dag-parse \
	container-tools prometheus-tools postgres-tools k8s-tools objectstore-tools distributed-tools \
	images test-container test-postgres test-k8s test-distributed test-load \
	bench-serving bench-promotion bench-train bench-slim bench-distributed screenshots

## run: install, start MLflow + Airflow (+ Prometheus) locally, train and deploy once, print where things are
# PIPELINE_DB=postgres make run: both on a local PostgreSQL server instead of SQLite (README).
# PIPELINE_EXECUTOR=celery make run: the distributed shape (docs/operations.md, "From one machine
# to many"): CeleryExecutor, Redis, PostgreSQL, an object store, two workers as hosts of their own.
run: $(STAMP) up
	$(PY) scripts/stack.py run

up: $(STAMP)
	@if [ "$(PIPELINE_DB)" = postgres ] || [ "$(PIPELINE_DB)" = postgresql ]; then \
		scripts/install_postgres.sh || echo "PostgreSQL not installed: see scripts/install_postgres.sh"; fi
	@if [ "$(PIPELINE_EXECUTOR)" = celery ]; then $(MAKE) --no-print-directory objectstore-tools distributed-tools; fi
	@scripts/install_prometheus.sh || echo "Prometheus not installed: the stack runs without it (see scripts/install_prometheus.sh)"
	$(PY) scripts/stack.py up

## stop: stop every process of the stack (what make run, its tasks and rollouts started; PostgreSQL, Prometheus), a starting make run first
stop:
	@if [ -x $(PY) ]; then $(PY) scripts/stack.py down; fi

status: $(STAMP)
	$(PY) scripts/stack.py status

## test: lint, then unit, DAG, integration, PostgreSQL, Kubernetes and container tests (real MLflow, Airflow, HTTP, a Kubernetes control plane, podman)
# Two pytest-xdist workers by default (tests/conftest.py: which tests share a worker);
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint container-tools prometheus-tools postgres-tools k8s-tools objectstore-tools \
		distributed-tools
	$(VENV)/bin/pytest -n $(TEST_WORKERS)

# podman, runc, debootstrap from apt (needs root). Without them the container test prints
# one SKIPPED line with the reason instead of failing.
container-tools:
	@scripts/install_container_tools.sh || echo "container tools not installed: the container test will say SKIPPED and why"

# promtool (Debian's prometheus package, no service started) for the alert-rule and dashboard
# tests. Without it they print one SKIPPED line with the reason instead of failing. `up` runs
# it too: the stack starts the package's `prometheus` binary itself (scripts/stack.py).
prometheus-tools:
	@scripts/install_prometheus.sh || echo "promtool not installed: the alert-rule tests will say SKIPPED and why"

## images: build the serving + pipeline images with podman, offline (docs/containers.md)
images: $(STAMP)
	scripts/build_images.sh all

test-container: $(STAMP) container-tools
	$(VENV)/bin/pytest -m container -ra

# The Kubernetes tier's control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, KWOK), built once per machine from the Go module pinned in
# tests/k8s/controlplane into ~/.cache/train-and-deploy/controlplane (minutes the first time;
# docs/benchmarks.md). Binaries in $$KUBEBUILDER_ASSETS (envtest's download) are used instead.
# Without Go the tier prints one SKIPPED line naming what to install; with Go, a failed
# build fails `make test`.
k8s-tools: $(STAMP)
	@if command -v go >/dev/null; then $(PY) -m tests.k8s.cluster build; \
	else echo "Go not installed: the k8s tier will say SKIPPED and why (install Go >= 1.26)"; fi

## test-k8s: the Kubernetes tier alone (tests/k8s: rollouts, RBAC, admission, the pipeline's pods)
test-k8s: $(STAMP) k8s-tools
	$(VENV)/bin/pytest -m k8s -ra

# The object store (MinIO) of the distributed shape, built once per machine from the Go module
# pinned in scripts/objectstore into ~/.cache/train-and-deploy/objectstore (7 min the first time
# on 2 cores). Without Go the distributed tier prints one SKIPPED line naming what to install.
objectstore-tools: $(STAMP)
	@if command -v go >/dev/null; then $(PY) -m scripts.stacklib.objectstore build; \
	else echo "Go not installed: the distributed tier will say SKIPPED and why (install Go >= 1.26)"; fi

# Redis (Celery's broker) from apt, and the worker hosts' system users (needs root). Without
# them the distributed tier prints one SKIPPED line with the reason.
distributed-tools: postgres-tools
	@scripts/install_distributed.sh || echo "Redis or the worker users not installed: the distributed tier will say SKIPPED and why"

## test-distributed: the object store and the CeleryExecutor shape alone (tests/distributed)
test-distributed: $(STAMP) objectstore-tools distributed-tools
	$(VENV)/bin/pytest -m distributed -ra

# The PostgreSQL server from apt (needs root; its own cluster is not started). Without it the
# postgres tests print one SKIPPED line with the reason instead of failing.
postgres-tools:
	@scripts/install_postgres.sh || echo "PostgreSQL not installed: the postgres tests will say SKIPPED and why"

## test-postgres: MLflow's registry and webhooks, and Airflow's metadata DB, on a throwaway PostgreSQL
test-postgres: $(STAMP) postgres-tools
	$(VENV)/bin/pytest -m postgres -ra

## test-load: the load scenarios the default run leaves out (the paced 50-promotion burst)
test-load: $(STAMP) postgres-tools
	$(VENV)/bin/pytest -m load -ra

test-unit: $(STAMP)
	$(VENV)/bin/pytest -m "not integration"

# Let pytest cache its rewritten test modules (and Python the project's bytecode) under the
# gitignored __pycache__/ even where PYTHONDONTWRITEBYTECODE=1 is exported: collecting the
# suite otherwise rewrites every test module again, every run (~4 s of the unit tier).
test test-unit test-container test-postgres test-k8s test-distributed test-load: export PYTHONDONTWRITEBYTECODE :=

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

install: $(STAMP)

# The venv is rebuilt only when the dependency pins change.
$(STAMP): pyproject.toml constraints.txt scripts/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/bootstrap.sh
	@touch $@

## screenshots: the docs' approval form and model card, in a real browser (chromium from apt, playwright-core from npm), from a running stack (make up)
screenshots: $(STAMP)
	scripts/install_browser.sh
	$(PY) scripts/screenshots.py

## bench-serving: model server vs stock MLflow serving (wrk from apt); writes docs/benchmarks.md
bench-serving: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) scripts/bench_serving.py

## bench-promotion: on a running stack (make run), time @champion moves until they are live
bench-promotion: $(STAMP)
	$(PY) scripts/bench_promotion.py

## bench-train: validate/train/evaluate at 10k..50M synthetic rows vs a bare Keras loop; writes docs/benchmarks.md
bench-train: $(STAMP)
	$(PY) scripts/bench_train.py

## bench-distributed: one nightly run on PIPELINE_EXECUTOR=celery next to the local stack (root)
bench-distributed: $(STAMP) objectstore-tools distributed-tools
	$(PY) scripts/bench_distributed.py

bench-dag-parse: $(STAMP)
	$(PY) scripts/bench_dag_parse.py

## bench-slim: the slim serving image's targets (podman)
bench-slim: $(STAMP)
	$(PY) scripts/bench_slim_image.py

## lock: re-pin constraints.txt from the current (tested) venv, and requirements.txt from it
# requirements.txt is for `pip install -r requirements.txt` without uv or this checkout:
# pyproject.toml's runtime + dev dependencies resolved with every version fixed by
# constraints.txt, so it is the tested set minus what nothing needs (pip). Its header and
# annotations hold no date, path or index URL, so re-running on the same venv changes nothing;
# tests/test_lock.py fails when the two files drift apart.
# constraints.txt keeps its header comment, and is replaced only once the freeze succeeded.
lock:
	set -o pipefail; { grep '^#' constraints.txt; \
		$(VENV)/bin/uv pip freeze --python $(PY) --exclude-editable | grep -v '^uv=='; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --constraint constraints.txt \
		--python $(PY) --custom-compile-command "make lock" --annotation-style line \
		--quiet --output-file requirements.txt

clean: stop
	rm -rf .local
