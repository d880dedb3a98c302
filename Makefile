# The two commands a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
AZURITE := tests/azurite/node_modules/.bin/azurite-blob

.PHONY: venv demo test lint typecheck clean

venv: $(STAMP)

# torch is pinned here, before the project, so that pip takes the CPU wheel instead of
# resolving an open range to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[airflow,s3,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo

test: $(STAMP) $(AZURITE) lint typecheck
	$(PY) -m pytest

# Azurite, the Azure Blob emulator the store tests start (tests/cloud_servers.py): npm, pinned by
# tests/azurite/package-lock.json, into tests/azurite/node_modules (git-ignored). No install scripts.
.PHONY: azurite

azurite: $(AZURITE)

$(AZURITE): tests/azurite/package.json tests/azurite/package-lock.json
	npm ci --prefix tests/azurite --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $(AZURITE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Chaos (issue 6): 50 seeded fault schedules per store (local files, SeaweedFS), each judged
# by the checker from the ledger and the output files, then the soak (16 workers x 2,000
# shards). `make test` runs a quick set of schedules (tests/chaos/test_chaos.py).
.PHONY: chaos

chaos: $(STAMP)
	$(PY) -m tests.chaos.run --schedules 50 --stores local,seaweedfs --soak

clean:
	rm -rf .demo .pytest_cache .mypy_cache .ruff_cache

# The option tables of README.md and docs/user-guide.md, made from JobSpec's fields and the
# builder's own options (scripts/option_tables.py); tests/airflow/test_job_options.py fails
# when they are stale.
.PHONY: docs-options

docs-options: $(STAMP)
	$(PY) -m scripts.option_tables

# The built wheel installed as users install it (docs/worker-images.md): into a fresh venv
# holding only Airflow and the cncf-kubernetes provider, and into one without Airflow. It takes
# minutes of pip, so `make test` leaves it out. docker-lint: hadolint on the worker images.
.PHONY: install-check docker-lint

install-check: $(STAMP)
	BUILD_PYTHON=$(PY) PYTHON=$(PYTHON) bash scripts/check_install.sh

docker-lint: $(STAMP)
	$(VENV)/bin/hadolint docker/Dockerfile.cpu docker/Dockerfile.cuda

# Benchmarks (docs/benchmarks.md). Ray Data, matplotlib and psutil live in their own
# environment, bench/.venv-ray, so that they never enter the product's dependencies; the
# naive loop, the bound and the antbatch worker run in the project's own environment.
BENCH_VENV ?= bench/.venv-ray
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp

.PHONY: bench-quick bench bench-venv

bench-venv: $(BENCH_STAMP)

# torch first, pinned: the CPU wheel on disk, not a multi-GB CUDA build pulled in by ray's deps.
# aiohttp: without it Ray 2.60 fails at random listing files through an fsspec filesystem
# (its check for fsspec's HTTP filesystem only catches the first failed import).
$(BENCH_STAMP):
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q 'ray[data]==2.60.0' pyarrow fsspec matplotlib psutil aiohttp
	$(BENCH_PY) -m pip install -q --no-deps -e .
	touch $(BENCH_STAMP)

bench-quick: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.run --quick

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.run

# Rewrite every generated block of docs/benchmarks.md from bench/results (bench/docgen.py);
# make bench-docs-check fails when the page is stale (tests/test_bench_docgen.py does the same).
.PHONY: bench-docs bench-docs-check

bench-docs: $(STAMP)
	$(PY) -m bench.docgen

bench-docs-check: $(STAMP)
	$(PY) -m bench.docgen --check

# Kill a job at half its rows and rerun it: antbatch's resume against Ray Data's row-id
# checkpointing, and both from scratch (docs/benchmarks.md, "Resume after a kill").
# Tried as a new user would (issue 16): antbatch run at its defaults against the plain loop and
# Ray Data, whole processes, 120,000 and 600,000 rows; about 6 minutes on a quiet 2-core machine
# (bench-newuser-quick: the short job once, about a minute).
.PHONY: bench-newuser bench-newuser-quick

bench-newuser: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.newuser

bench-newuser-quick: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.newuser --quick

.PHONY: bench-resume

bench-resume: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.resume

# Small objects behind S3 (SeaweedFS from the test extra, latency added by a proxy): unmerged
# reads against merge + packs, and the merge's concurrency sweep. The PNG is drawn in bench/.venv-ray.
.PHONY: bench-smallfiles-quick bench-smallfiles

bench-smallfiles-quick: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.smallfiles --quick

bench-smallfiles: $(STAMP) $(BENCH_STAMP)
	$(PY) -m bench.smallfiles

# Claiming at scale (issue 13, docs/scale.md): the real Claimer and Ledger for W = 1, 10, 100 and
# 1,000 simulated workers on a virtual clock against an S3-like in-memory store. Only the project
# venv is needed; docs/scale.png is drawn in bench/.venv-ray when that exists.
.PHONY: bench-scale-quick bench-scale

bench-scale-quick: $(STAMP)
	$(PY) -m bench.scale --quick

bench-scale: $(STAMP)
	$(PY) -m bench.scale

# Stragglers (issue 16): 4 workers, one throttled 2x (and again 5x), with dynamic dispatch and
# speculative backups, without backups, and static; about 2 minutes. bench/results/straggler.json.
.PHONY: bench-straggler

bench-straggler: $(STAMP)
	$(PY) -m bench.straggler

# Elastic pool (issue 14, docs/benchmarks.md "Elastic pool"): the mapped fan-out against the pool
# (the real PoolController) on bench/elastic_trace.json, simulated time, under a minute.
# bench/results/elastic.json; docs/benchmarks-elastic.png is drawn in bench/.venv-ray.
.PHONY: bench-elastic bench-preempt

bench-elastic: $(STAMP)
	$(PY) -m bench.elastic
	$(PY) -m bench.docgen

bench-preempt: $(STAMP)
	$(PY) -m bench.preempt

# The GPU check (issue 16, docs/benchmarks.md "GPU"): on a lent GPU machine, with that machine's
# own python3 (torch with CUDA, pyarrow, fsspec, numpy; no venv, no Airflow), at most 8 minutes.
# Results: $OUT/gpu.json when OUT is set, else bench/results/gpu.json. `make test` runs its
# --dry-run on the CPU (tests/test_bench_gpu.py).
.PHONY: gpu-check

gpu-check:
	PYTHONPATH=. python3 -m bench.gpu
