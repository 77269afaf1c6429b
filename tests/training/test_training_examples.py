"""examples/peft_lora.py and examples/trl_sft.py run (two steps each) and print what docs/training.md says they do."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, needs: str, out_dir: Path, monkeypatch, capsys) -> str:
    """Runs examples/`name` for two steps of batch 2 (skipped without package `needs`); returns what it printed."""
    pytest.importorskip(needs)
    monkeypatch.setattr(sys, "argv", [name, "--steps", "2", "--batch-size", "2", "--out", str(out_dir)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_peft_lora_example(tmp_path, monkeypatch, capsys):
    out = run_example("peft_lora.py", "peft", tmp_path, monkeypatch, capsys)
    assert "merged model keeps PyramidDrop: True" in out
    assert "visual tokens per stage: [144, 72, 36, 18]" in out
    assert '"pyramid_drop"' in (tmp_path / "adapter" / "config.json").read_text()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_trl_sft_example(tmp_path, monkeypatch, capsys):
    out = run_example("trl_sft.py", "trl", tmp_path, monkeypatch, capsys)
    assert "training loss" in out
    assert "visual tokens per stage at the last step: [144, 72, 36, 18]" in out
