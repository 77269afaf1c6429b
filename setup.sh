#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0 (installed first, so no dependency pulls a CUDA build)
# and this package in editable mode with its dev extras, plus lmms-eval for the harness tests. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
# lmms-eval (the `lmms` extra) for tests/test_lmms_eval.py. Its wheel requires torchvision, which has no CPU
# build here and would switch transformers to other image processors, so the packages its evaluation path
# imports go in first (torch pinned so nothing replaces it) and lmms-eval itself without its declared ones.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" datasets evaluate loguru pytablewriter \
    pytz sacrebleu tenacity
.venv/bin/pip install -q --disable-pip-version-check --no-deps "lmms-eval==0.7.3"
