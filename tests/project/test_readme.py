"""The README's code as written: the tiny-model example and the quickstart run, every Python block parses, and CI
runs the README's test command verbatim."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_tiny_model_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    example = next(block for block in readme_blocks("python") if "tests/data/official_pdrop_public" in block)
    exec(compile(example, "README.md", "exec"), {})
    assert "[256, 128, 64, 32]" in capsys.readouterr().out


def test_every_readme_python_block_parses():
    """The real-model snippets need a GPU and the hub to run; here they must at least be valid Python."""
    blocks = readme_blocks("python")
    assert len(blocks) >= 3
    for block in blocks:
        compile(block, "README.md", "exec")


def test_ci_runs_the_readme_test_command():
    commands = [line.split("#")[0].strip() for block in readme_blocks("bash") for line in block.splitlines()]
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command == "./setup.sh && .venv/bin/python -m pytest -q"
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_quickstart_matches_the_official_tokens(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "(equal)" in out and "[256, 153, 76, 38]" in out


def test_readme_is_a_landing_page_of_at_most_150_lines():
    """The manual lives in docs/; README stays a page one reads to the end."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
