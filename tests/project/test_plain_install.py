"""A plain `pip install .` (no extras) beside torch: every core module imports, `pdrop generate --help` and
examples/quickstart.py run.

Simulated without installing anything: a child interpreter (`-I -S`, so no site-packages) sees only the
distributions that the core dependencies pull in, code and metadata, symlinked into a temporary site folder,
plus this package's source. Whatever only an extra or the test tools bring (matplotlib, accelerate, lmms-eval,
pytest, datasets, ...) is absent there, as it is after a plain install.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# modules that need an extra at import time, and which one; any other module must import without extras
NEEDS_EXTRA = {
    "pyramiddrop.integrations.lmms_eval": "lmms",
    "pyramiddrop.integrations.trl": "trl",
    "pyramiddrop.serving.vllm.models": "vllm",  # subclasses vLLM's model classes
}

CHILD = r"""
import contextlib, importlib, io, json, pkgutil, runpy, sys
site, src, quickstart = sys.argv[1:4]
sys.path[:0] = [site, src]
import pyramiddrop
from pyramiddrop.cli import main

failed = {}
for module in pkgutil.walk_packages(pyramiddrop.__path__, "pyramiddrop."):
    try:
        importlib.import_module(module.name)
    except ImportError as error:
        failed[module.name] = repr(error)
help_text, quickstart_out = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    main(["generate", "--help"])
with contextlib.redirect_stdout(quickstart_out):
    runpy.run_path(quickstart, run_name="__main__")
json.dump({"failed": failed, "help": help_text.getvalue(), "quickstart": quickstart_out.getvalue()}, sys.stdout)
"""


def core_distributions() -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that pyproject.toml's core dependencies need, transitively."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo, found = [Requirement(line) for line in project["dependencies"]], {}
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(name)
        for line in dist.requires or []:
            needed = Requirement(line)
            extras = ["", *requirement.extras]
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(needed)
    return found


def plain_site(folder: Path) -> Path:
    """A site folder of symlinks to the top-level files and folders of the core distributions only."""
    for dist in core_distributions().values():
        location = Path(dist.locate_file(""))
        for top in {file.parts[0] for file in dist.files or []} - {"..", "__pycache__"}:
            if not (folder / top).exists() and not top.endswith(".pth"):
                (folder / top).symlink_to(location / top)
    return folder


def test_core_without_extras(tmp_path):
    site = plain_site(tmp_path)
    assert not {"matplotlib", "accelerate", "lmms_eval", "pytest"} & {path.name for path in site.iterdir()}
    quickstart = ROOT / "examples" / "quickstart.py"
    command = [sys.executable, "-I", "-S", "-c", CHILD, str(site), str(ROOT / "src"), str(quickstart)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, f"without the extras:\n{done.stderr[-4000:]}"
    result = json.loads(done.stdout)
    unexpected = {name: error for name, error in result["failed"].items() if name not in NEEDS_EXTRA}
    assert not unexpected, f"these need a package that only an extra installs; import it where it is used: {unexpected}"
    assert set(result["failed"]) == set(NEEDS_EXTRA), "NEEDS_EXTRA lists a module that imports without extras"
    assert result["help"].startswith("usage: pdrop generate")
    assert "(equal)" in result["quickstart"] and "[256, 153, 76, 38]" in result["quickstart"]
