#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (its image has torch, accelerate, transformers,
# tensorboard, torchmetrics, pytest; not these) into .whl/, which bench/gpu_check.sh installs from.
# The GPU machine's python3 is 3.12 on x86-64; DeepSpeed ships as source and is built here into a
# pure-Python wheel (its ops compile on first use there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
for pkg in webdataset braceexpand fire termcolor hjson pydantic pydantic-core annotated-types \
           typing-inspection ninja torch-fidelity scipy; do
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 -d .whl "$pkg"
done
$PY -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "deepspeed==$($PY -m pip show deepspeed | sed -n 's/^Version: //p')"
ls -la .whl
