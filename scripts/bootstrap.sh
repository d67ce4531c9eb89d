#!/usr/bin/env bash
# Create the virtual environment and install the pinned dependency set.
# constraints.txt is a freeze of a tested install (Airflow's published constraints URL is not
# reachable from every machine, so we commit our own); pyproject.toml says what we depend on.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
UV_VERSION=0.13.9

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "bootstrap: $PYTHON not found; this project needs CPython 3.11 (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
echo "bootstrap: installing pinned dependencies (constraints.txt) into $VENV"
"$VENV/bin/uv" pip install --python "$VENV/bin/python" \
    --constraint constraints.txt --editable '.[dev]'
# Compile every installed module to bytecode once, here. uv does not by default, and where
# PYTHONDONTWRITEBYTECODE=1 is set (these machines set it) Python never caches bytecode
# itself: every process then compiled each module it imported from source, every time
# (TensorFlow's import 18 s instead of 6, MLflow's 5 s instead of 2; docs/benchmarks.md).
# Up-to-date files are skipped, so a re-run costs seconds.
echo "bootstrap: compiling the installed modules to bytecode"
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null \
    || echo "bootstrap: some installed files did not compile; their modules compile when imported" >&2
