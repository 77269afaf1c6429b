#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0 (installed first, so no dependency pulls a CUDA build)
# and this package in editable mode with its dev extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
