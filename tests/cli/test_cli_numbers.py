"""Every numeric command-line option states its range and is checked at parsing (issue 36): the parser itself is
walked, so an option added without a range fails here; and the issue's four cases through the `pdrop` entry point."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pyramiddrop.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
# What each command needs besides the option under test (parsing only: nothing is opened or loaded).
REQUIRED = {
    "generate": ["--image", "a.png", "--prompt", "p"],
    "show": ["--image", "a.png", "--prompt", "p"],
    "tune": ["--budget", "0.3"],
}


def options() -> list[tuple[str, argparse.Action]]:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return [
        (command, action)
        for command, subparser in commands.choices.items()
        for action in subparser._actions
        if action.option_strings
    ]


def is_ranged(action: argparse.Action) -> bool:
    return callable(getattr(action.type, "outside", None)) and bool(getattr(action.type, "text", ""))


def test_every_numeric_option_has_a_type_that_states_its_range():
    unranged = []
    for command, action in options():
        numeric_default = isinstance(action.default, int | float) and not isinstance(action.default, bool)
        plain = action.type in (int, float) or (action.type is None and numeric_default and action.nargs != 0)
        if plain or (numeric_default and not is_ranged(action)):
            unranged.append(f"pdrop {command} {action.option_strings[0]}")
    assert unranged == []
    ranged = {(command, action.option_strings[-1]) for command, action in options() if is_ranged(action)}
    expected = {("eval", "--limit"), ("eval", "--batch-size"), ("tune", "--trials"), ("show", "--frames")}
    expected |= {("study", "--layers"), ("study", "--ratios"), ("tune", "--stages"), ("generate", "--max-new-tokens")}
    expected |= {("bench", "--repeats"), ("bench", "--visual-tokens"), ("eval", "--seed"), ("generate", "--lam")}
    assert expected <= ranged


CASES = [
    (command, action.option_strings[-1], value)
    for command, action in options()
    if is_ranged(action)
    for value in [*action.type.outside(), "x"]
]
WALK = """
import contextlib, io, json, sys
from pyramiddrop.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    error = io.StringIO()
    with contextlib.redirect_stderr(error):
        try:
            main(argv)
            code = 0
        except SystemExit as exit:
            code = exit.code
    results.append({"code": code, "stderr": error.getvalue()})
print(json.dumps({"results": results, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def test_a_value_outside_the_range_or_no_number_is_one_line_naming_the_option_with_status_2(tmp_path):
    assert len(CASES) > 60
    argvs = [[command, *REQUIRED.get(command, []), option, value] for command, option, value in CASES]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", WALK, json.dumps(argvs)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["heavy"] == []  # nothing was loaded: no torch, no transformers
    wrong = []
    for (command, option, value), outcome in zip(CASES, summary["results"]):
        prefix = f"pdrop {command}: error: argument "
        line = outcome["stderr"]
        one_line = line.endswith("\n") and line.count("\n") == 1 and line.startswith(prefix)
        reason = "is not a" if value == "x" else "is out of range; give"
        if outcome["code"] != 2 or not one_line or option not in line or reason not in line:
            wrong.append((command, option, value, outcome))
    assert wrong == []


def pdrop(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The `pdrop` console script as pyproject declares it (module:function), in a fresh interpreter."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["pdrop"]
    module, function = target.split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--limit", "0"], "pdrop eval: error: argument --limit: 0 is out of range; give a positive integer"),
        (["eval", "--limit", "-5"], "pdrop eval: error: argument --limit: -5 is out of range; give a positive integer"),
        (["eval", "--batch-size", "0"], "pdrop eval: error: argument --batch-size: 0 is out of range; give a positive"),
        (
            ["study", "--layers", "0", "99"],
            "pdrop study: error: argument --layers: layer 99 is outside the model, which has 8 decoder layers; give "
            "layers from 0 to 7",
        ),
    ],
    ids=["limit 0", "limit -5", "batch-size 0", "study layers 0 99"],
)
def test_the_issues_four_cases_end_in_one_line_with_status_2(argv, message, tmp_path, synthetic_model_dir):
    result = pdrop(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr  # no progress bar: no work
    assert result.stdout == ""
