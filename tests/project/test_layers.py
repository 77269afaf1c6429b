"""The package's layers (issue 31): the core (api, config, methods, settings, engine, scoring, adapters and the
schedules) never imports the tools, the command line, the synthetic task or the integrations; the tools never
import the command line. Checked two ways: every import statement in the source (lazy ones too), and what importing
each core module actually loads, in a fresh interpreter."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pyramiddrop

PACKAGE = Path(pyramiddrop.__file__).parent
ABOVE_THE_CORE = ("tools", "cli", "synthetic", "integrations", "serving")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ABOVE_THE_CORE else "core"


def imported_modules(path: Path) -> set[str]:
    """Every `pyramiddrop...` module an import statement of `path` names, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pyramiddrop import tools`
    return {name for name in names if name.startswith("pyramiddrop.")}


SOURCES = sorted(PACKAGE.rglob("*.py"))
CORE = [path for path in SOURCES if layer(module_name(path)) == "core"]


def test_the_scan_sees_the_layers():
    assert {"pyramiddrop.api", "pyramiddrop.config", "pyramiddrop.methods", "pyramiddrop.budget"} <= {
        module_name(path) for path in CORE
    }
    assert any(module_name(path) == "pyramiddrop.tools.inputs" for path in SOURCES)
    assert imported_modules(PACKAGE / "cli" / "evaluate.py") >= {"pyramiddrop.tools.evaluate"}  # lazy imports too


def test_no_core_module_imports_tools_cli_synthetic_or_integrations():
    leaks = {
        module_name(path): sorted(name for name in imported_modules(path) if layer(name) != "core") for path in CORE
    }
    assert {name: found for name, found in leaks.items() if found} == {}


def test_tools_do_not_import_the_command_line_or_the_integrations():
    tools = [path for path in SOURCES if layer(module_name(path)) == "tools"]
    leaks = {
        module_name(path): sorted(name for name in imported_modules(path) if layer(name) in ("cli", "integrations"))
        for path in tools
    }
    assert tools and {name: found for name, found in leaks.items() if found} == {}


def test_importing_the_core_loads_nothing_above_it():
    names = [module_name(path) for path in CORE]
    code = f"""
import importlib, json, sys
for name in {names!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("pyramiddrop.") and m.split(".")[1] in {ABOVE_THE_CORE!r})))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_no_module_in_src_is_over_400_lines():
    long = {module_name(path): n for path in SOURCES if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
