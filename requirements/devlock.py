"""Reads requirements/dev.lock and dev.in and compares them with the running environment (docs/development.md).

`python requirements/devlock.py` prints what differs from the lock and exits 1 if anything does; setup.sh runs it
after installing and, before skipping an install, to check that nothing changed. `--extraneous` prints the
installed distributions that the lock does not list (setup.sh removes them), `--torch` the torch requirement
that setup.sh installs first. The tests import it too. `--env vllm` before any of these reads
requirements/vllm.lock and vllm.in instead (setup-vllm.sh, the .venv-vllm environment).
Standard library only, so that it runs before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"
INPUTS = ROOT / "requirements" / "dev.in"
# the other locked environments: name -> (lock, inputs); `--env NAME` selects one
ENVS = {"dev": (LOCK, INPUTS), "vllm": (ROOT / "requirements" / "vllm.lock", ROOT / "requirements" / "vllm.in")}
PROJECT = "pyramiddrop"
# installed in the venv but not by the lock: torch (setup.sh, first), this package (setup.sh, last) and pip
NOT_LOCKED = {"torch", PROJECT, "pip"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_INPUT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def canonical(name: str) -> str:
    """PEP 503 normalized name: `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} for every `name==version` line of the lock."""
    return {canonical(m[1]): m[2] for line in path.read_text().splitlines() if (m := _PIN.match(line))}


def read_inputs(path: Path = INPUTS) -> dict[str, str]:
    """{canonical name: version specifier} for the requirement lines of dev.in (`torch==2.13.0+cpu`, ...)."""
    rows = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonical(m[1]): m[2].strip() for row in rows if row and (m := _INPUT.match(row))}


def torch_requirement(inputs: Path = INPUTS) -> str:
    """The torch that setup.sh installs before the lock, as a pip requirement (`torch==2.13.0+cpu`)."""
    return "torch" + read_inputs(inputs)["torch"]


def installed() -> dict[str, str]:
    """{canonical name: version} of the distributions the running interpreter sees."""
    return {canonical(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}


def problems(
    lock: dict[str, str] | None = None, have: dict[str, str] | None = None, inputs: Path = INPUTS
) -> list[str]:
    """What differs between the environment and the lock, one line each; empty when they agree."""
    lock = read_lock() if lock is None else lock
    have = installed() if have is None else have
    out = [
        f"{name}: locked {version}, installed {have.get(name, 'nothing')}"
        for name, version in sorted(lock.items())
        if have.get(name) != version
    ]
    torch = read_inputs(inputs)["torch"].removeprefix("==")
    if have.get("torch") != torch:
        out.append(f"torch: setup.sh installs {torch}, installed {have.get('torch', 'nothing')}")
    spec = importlib.util.find_spec(PROJECT)
    if spec is None or spec.origin is None or not Path(spec.origin).is_relative_to(ROOT / "src"):
        out.append(f"{PROJECT}: not installed in editable mode from {ROOT}")
    return out


def extraneous(lock: dict[str, str] | None = None, have: dict[str, str] | None = None) -> list[str]:
    """Installed distributions that neither the lock nor setup.sh put there."""
    lock = read_lock() if lock is None else lock
    have = installed() if have is None else have
    return sorted(set(have) - set(lock) - NOT_LOCKED)


def main(argv: list[str]) -> int:
    lock_path, inputs = LOCK, INPUTS
    if argv[:1] == ["--env"]:
        if len(argv) < 2 or argv[1] not in ENVS:
            print(f"--env takes one of {', '.join(ENVS)}", file=sys.stderr)
            return 2
        (lock_path, inputs), argv = ENVS[argv[1]], argv[2:]
    if argv == ["--torch"]:
        print(torch_requirement(inputs))
        return 0
    if argv == ["--extraneous"]:
        for name in extraneous(read_lock(lock_path)):
            print(name)
        return 0
    found = problems(read_lock(lock_path), inputs=inputs)
    if found:
        print(f"The environment differs from {lock_path.relative_to(ROOT)}:", *found, sep="\n  ", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
