#!/usr/bin/env bash
# Regenerates requirements/dev.lock from pyproject.toml (dependencies, extras dev and lmms) and
# requirements/dev.in, with the uv pinned here in a throwaway venv and the settings in requirements/uv.toml.
# Pins already in dev.lock are kept unless an input needs otherwise; extra arguments go to `uv pip compile`:
#   requirements/lock.sh --upgrade                         # every package to its newest allowed version
#   requirements/lock.sh --upgrade-package transformers    # one package
# Then run ./setup.sh && .venv/bin/python -m pytest -q before committing the lock (docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
uv_version=0.13.9
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool"
"$tool/bin/pip" install -q --disable-pip-version-check "uv==$uv_version"
"$tool/bin/uv" pip compile --config-file requirements/uv.toml pyproject.toml requirements/dev.in \
    --extra dev --extra lmms -o requirements/dev.lock "$@"
