#!/usr/bin/env bash
# Creates .venv exactly as requirements/dev.lock says (docs/development.md): first the CPU build of torch from
# this machine's wheel folder (the pin is in requirements/dev.in), then every locked package at its locked
# version and hash without resolving anything (--no-deps; lmms-eval for the harness tests is among them), then
# this package in editable mode. Safe to re-run: when the lock, its inputs and pyproject.toml are those of the
# last complete run (the stamp in .venv) and the installed versions still match the lock, pip is not run.
set -euo pipefail
cd "$(dirname "$0")"
lock=requirements/dev.lock
stamp_file=.venv/.dev-lock.sha256
pip=(.venv/bin/pip install -q --disable-pip-version-check --no-deps)

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup.sh: $lock is resolved for Python 3.11; .venv has $(.venv/bin/python -V)" >&2
    exit 1
fi
stamp=$(cat "$lock" requirements/dev.in pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] && .venv/bin/python requirements/devlock.py; then
    exit 0
fi
rm -f "$stamp_file"
"${pip[@]}" "$(.venv/bin/python requirements/devlock.py --torch)"
"${pip[@]}" --require-hashes -r "$lock"
mapfile -t extra < <(.venv/bin/python requirements/devlock.py --extraneous)
if [ "${#extra[@]}" -gt 0 ]; then
    .venv/bin/pip uninstall -q -y "${extra[@]}"
fi
"${pip[@]}" --no-build-isolation -e .
.venv/bin/python requirements/devlock.py
echo "$stamp" >"$stamp_file"
