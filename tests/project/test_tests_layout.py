"""The tests' own layout (issue 31): test modules sit in folders by subject, and no test module imports another
one. Shared fixtures live in a `conftest.py`, shared helpers in `tests/support/` (on pytest's `pythonpath`)."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_test_modules(source: str) -> list[str]:
    """What `source` imports from a module named `test_*`, lazy imports inside functions included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                alias.name for alias in node.names if any(part.startswith("test_") for part in alias.name.split("."))
            ]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if any(part.startswith("test_") for part in (node.module or "").split(".")):
                found.append(module)
            elif node.level:  # `from . import test_cli`
                found += [f"{module}{alias.name}" for alias in node.names if alias.name.startswith("test_")]
    return found


def test_the_check_sees_every_form_of_importing_a_test_module():
    source = """
import test_cli
import tests.cli.test_cli as cli_tests
from test_training import multi_turn_batch
from .test_cli import run
from . import test_cli, conftest

def lazy():
    from test_qwen_onevision import qwen_samples

import tiny_models
from tiny_models import collate
from pyramiddrop.cli import main
"""
    assert imported_test_modules(source) == [
        "test_cli",
        "tests.cli.test_cli",
        "test_training",
        ".test_cli",
        ".test_cli",
        "test_qwen_onevision",
    ]


def test_no_test_module_imports_another():
    offenders = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        imported = imported_test_modules(path.read_text())
        if imported:
            offenders[str(path.relative_to(TESTS))] = imported
    assert not offenders, (
        f"test modules importing other test modules: {offenders}; move shared fixtures into a conftest.py and "
        "shared helpers into tests/support/"
    )


def test_test_modules_sit_in_subject_folders():
    assert sorted(path.name for path in TESTS.glob("test_*.py")) == [], "put the test module in a folder by subject"
    assert sorted(path.name for path in (TESTS / "support").glob("test_*.py")) == [], (
        "tests/support/ holds helpers, not tests: move the test module to a folder by subject"
    )
