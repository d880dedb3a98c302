#!/usr/bin/env bash
# `make install-check`: install the built wheel the way users do, in fresh virtualenvs.
#
# 1. Build the wheel and sdist (python -m build) and check their metadata (twine check).
# 2. An "existing deployment": a venv with only Airflow and the cncf-kubernetes provider (and
#    torch), then the wheel. `airflow providers list` must show airflow-antbatch, and the
#    example DAG runs there under `airflow dags test` (SQLite, a temporary AIRFLOW_HOME).
# 3. A worker image's environment: torch and the wheel with the s3 extra, no Airflow. It runs
#    `antbatch worker --help` and a small `antbatch run` over generated Parquet.
#
# torch is installed first and pinned in each venv, so pip takes the CPU wheel on this
# machine's disk instead of resolving a multi-GB CUDA build. Versions can be overridden from
# the environment; BUILD_PYTHON needs `build` and `twine` (the test extra has both).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUILD_PYTHON=${BUILD_PYTHON:-.venv/bin/python}
AIRFLOW_VERSION=${AIRFLOW_VERSION:-3.3.1}
CNCF_KUBERNETES_VERSION=${CNCF_KUBERNETES_VERSION:-10.25.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DS=2026-11-25
ROWS=3000

WORK=$(mktemp -d "${TMPDIR:-/tmp}/antbatch-install-check.XXXXXX")
if [[ -z "${KEEP_WORK:-}" ]]; then
    trap 'rm -rf "$WORK"' EXIT
fi
START=$SECONDS
step() { printf '== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
    printf 'install-check: %s\n' "$*" >&2
    exit 1
}
pip_install() { "$1/bin/python" -m pip install -q --disable-pip-version-check --prefer-binary "${@:2}"; }

step "build wheel and sdist into $WORK/dist"
"$BUILD_PYTHON" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || {
    tail -20 "$WORK/build.log"
    fail "python -m build failed (log above)"
}
"$BUILD_PYTHON" -m twine check --strict "$WORK"/dist/*
WHEEL=$(ls "$WORK"/dist/airflow_antbatch-*.whl)

# Pins that an existing deployment's own constraints would hold: installing the wheel must not
# upgrade or downgrade Airflow, the provider or torch.
cat >"$WORK/constraints.txt" <<EOF
apache-airflow==$AIRFLOW_VERSION
apache-airflow-providers-cncf-kubernetes==$CNCF_KUBERNETES_VERSION
torch==$TORCH_VERSION
EOF

step "deployment venv: torch==$TORCH_VERSION, apache-airflow==$AIRFLOW_VERSION, cncf-kubernetes==$CNCF_KUBERNETES_VERSION"
DEPLOY=$WORK/deploy
"$PYTHON" -m venv "$DEPLOY"
pip_install "$DEPLOY" "torch==$TORCH_VERSION"
pip_install "$DEPLOY" -c "$WORK/constraints.txt" "apache-airflow==$AIRFLOW_VERSION" \
    "apache-airflow-providers-cncf-kubernetes==$CNCF_KUBERNETES_VERSION"
step "deployment venv: the wheel"
pip_install "$DEPLOY" -c "$WORK/constraints.txt" "${WHEEL}[airflow]"
"$DEPLOY/bin/python" -m pip check

export AIRFLOW_HOME=$WORK/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$WORK/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export ANTBATCH_DATA_ROOT=$WORK/data
mkdir -p "$AIRFLOW__CORE__DAGS_FOLDER"
cp dags/nightly_batch_inference.py "$AIRFLOW__CORE__DAGS_FOLDER/"

step "airflow providers list"
"$DEPLOY/bin/airflow" providers list --output plain >"$WORK/providers.txt" 2>"$WORK/providers.err" || {
    cat "$WORK/providers.err"
    fail "airflow providers list failed"
}
grep -q '^airflow-antbatch ' "$WORK/providers.txt" || {
    cat "$WORK/providers.txt"
    fail "airflow-antbatch is not in 'airflow providers list'"
}
grep '^airflow-antbatch ' "$WORK/providers.txt"

# Input for one day, written by the installed package itself (no repo code on the path).
write_input() {
    "$1/bin/python" - "$2" "$ROWS" <<'EOF'
import pathlib
import sys

import pyarrow.parquet as pq

from airflow_antbatch.examples.tabular import generate_transactions

directory, rows = pathlib.Path(sys.argv[1]), int(sys.argv[2])
directory.mkdir(parents=True, exist_ok=True)
for i in range(3):
    table = generate_transactions(rows // 3, seed=i, first_id=i * (rows // 3))
    pq.write_table(table, directory / f"part-{i}.parquet", row_group_size=250)
EOF
}

# The manifest must count every input row once.
check_manifest() {
    "$1/bin/python" - "$2" "$ROWS" <<'EOF'
import sys

from airflow_antbatch.finalize import read_manifest

output, rows = sys.argv[1], int(sys.argv[2])
manifest = read_manifest(output)
if manifest is None:
    sys.exit(f"install-check: no manifest under {output}")
if int(manifest["rows"]) != rows:
    sys.exit(f"install-check: manifest under {output} counts {manifest['rows']} rows, expected {rows}")
print(f"manifest: {manifest['rows']} rows in {len(manifest['files'])} files under {output}")
EOF
}

step "example DAG: airflow db migrate, then airflow dags test nightly_batch_inference $DS"
write_input "$DEPLOY" "$ANTBATCH_DATA_ROOT/transactions/ds=$DS"
"$DEPLOY/bin/airflow" db migrate >"$WORK/migrate.log" 2>&1 || {
    tail -20 "$WORK/migrate.log"
    fail "airflow db migrate failed"
}
# dags test runs the local launcher's workers as `python -m airflow_antbatch`: the venv's bin
# must come first on PATH, as it would in a deployment's image.
PATH="$DEPLOY/bin:$PATH" "$DEPLOY/bin/airflow" dags test nightly_batch_inference "$DS" >"$WORK/dags-test.log" 2>&1 || {
    tail -40 "$WORK/dags-test.log"
    fail "airflow dags test failed (log: $WORK/dags-test.log; KEEP_WORK=1 keeps it)"
}
grep -q "DagRun Finished: dag_id=nightly_batch_inference, .* state=success," "$WORK/dags-test.log" || {
    tail -40 "$WORK/dags-test.log"
    fail "the run of nightly_batch_inference did not succeed"
}
check_manifest "$DEPLOY" "$ANTBATCH_DATA_ROOT/predictions/ds=$DS"

step "worker venv: torch==$TORCH_VERSION and the wheel with the s3 extra, no Airflow"
WORKER=$WORK/worker
"$PYTHON" -m venv "$WORKER"
pip_install "$WORKER" "torch==$TORCH_VERSION"
pip_install "$WORKER" -c "$WORK/constraints.txt" "${WHEEL}[s3]"
"$WORKER/bin/python" -m pip check
if "$WORKER/bin/python" -c "import airflow" 2>/dev/null; then
    fail "the worker venv can import airflow"
fi
"$WORKER/bin/antbatch" worker --help >/dev/null

step "worker venv: antbatch run over $ROWS generated rows"
write_input "$WORKER" "$WORK/job/in"
"$WORKER/bin/antbatch" run --input "$WORK/job/in" --output "$WORK/job/out" \
    --model airflow_antbatch.examples.tabular:build_model \
    --preprocess airflow_antbatch.examples.tabular:preprocess \
    --postprocess airflow_antbatch.examples.tabular:postprocess \
    --id-column txn_id --max-shard-rows 500 --workers 2 --cpu-budget 1
check_manifest "$WORKER" "$WORK/job/out"

step "install-check passed"
