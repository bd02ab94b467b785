#!/usr/bin/env bash
# Prepares a bare device machine (its own torch, no network) to run this repo's code:
# installs the packages it lacks from wheels carried in device_wheels/ (see BENCHMARKS.md).
set -euo pipefail
python3 -m pip install -q --no-deps device_wheels/*.whl 2>&1 | grep -v -e WARNING -e "pip as the 'root'" || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
