"""requirements/dev.lock against pyproject.toml's ranges, and the running environment against the lock."""

from __future__ import annotations

import devlock
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = tomllib.loads((devlock.ROOT / "pyproject.toml").read_text())
# requirements/lock.sh compiles dev and lmms; the others are in dev
LOCKED_EXTRAS = ("dev", "lmms", "plots", "train", "peft", "trl", "deepspeed", "tune")


def locked_versions() -> dict[str, str]:
    """The lock plus torch, which setup.sh installs before it (pinned in dev.in, kept out of the lock)."""
    return devlock.read_lock() | {"torch": devlock.read_inputs()["torch"].removeprefix("==")}


def declared() -> list[tuple[str, Requirement]]:
    """(where, requirement) for the core dependencies and the extras that the lock covers."""
    project = PYPROJECT["project"]
    rows = [("dependencies", Requirement(line)) for line in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        rows += [(f"extra {extra}", Requirement(line)) for line in project["optional-dependencies"][extra]]
    return rows


def test_lock_pins_satisfy_pyproject_ranges():
    locked, wrong = locked_versions(), []
    assert len(locked) > 50, "requirements/dev.lock lists too few packages; regenerate it with requirements/lock.sh"
    for where, requirement in declared():
        version = locked.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            wrong.append(f"{requirement} ({where}): locked {version or 'nothing'}")
    fix = "fix the range or run requirements/lock.sh"
    assert not wrong, f"dev.lock disagrees with pyproject.toml; {fix}:\n" + "\n".join(wrong)


def test_lock_pins_satisfy_dev_in():
    locked = locked_versions()
    wrong = [
        f"{name}{spec}: locked {locked.get(name, 'nothing')}"
        for name, spec in devlock.read_inputs().items()
        if name not in locked or not Requirement(f"{name}{spec}").specifier.contains(locked[name], prereleases=True)
    ]
    assert not wrong, "dev.lock is older than requirements/dev.in; run requirements/lock.sh:\n" + "\n".join(wrong)


def test_lock_leaves_torch_to_setup_sh():
    assert "torch" not in devlock.read_lock(), "an installer must never replace the CPU torch: keep it out of dev.lock"


def test_environment_is_the_lock():
    found = devlock.problems()
    assert not found, "this environment is not requirements/dev.lock; run ./setup.sh:\n" + "\n".join(found)
