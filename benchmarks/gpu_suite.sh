#!/usr/bin/env bash
# Every GPU measurement in one time-boxed run (issue 17): see benchmarks/gpu_suite.py for what and how.
#   benchmarks/gpu_suite.sh              # on a GPU node: 7-minute budget, results in $OUT (default benchmarks/out/)
#   benchmarks/gpu_suite.sh --dry-run    # the same code paths on the CPU with test_vit (under 2 minutes)
# Runs from a checkout without installing it (PYTHONPATH=lib), with the python3 on PATH (or $PYTHON).
# The data-loading rows need albumentations; on a node without a package index, download its wheels on a machine
# with one and install them first, e.g.
#   python3 -m pip download --no-deps -d .whl albumentations albucore pydantic pydantic-core annotated-types \
#       typing-inspection stringzilla simsimd
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT/lib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$ROOT/benchmarks/gpu_suite.py" "$@"
