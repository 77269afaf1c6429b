"""The README's tiny-model example and the quickstart run as written."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tiny_model_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    example = next(block for block in blocks if "tests/data/official_pdrop_public" in block)
    exec(compile(example, "README.md", "exec"), {})
    assert "[256, 128, 64, 32]" in capsys.readouterr().out


def test_quickstart_matches_the_official_tokens(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "(equal)" in out and "[256, 153, 76, 38]" in out
