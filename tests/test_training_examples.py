"""examples/peft_lora.py and examples/trl_sft.py run (two steps each) and print what docs/training.md says they do."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_peft_lora_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    run_example("peft_lora.py", monkeypatch, "--steps", "2", "--batch-size", "2", "--out", str(tmp_path))
    out = capsys.readouterr().out
    assert "merged model keeps PyramidDrop: True" in out
    assert "visual tokens per stage: [144, 72, 36, 18]" in out
    assert '"pyramid_drop"' in (tmp_path / "adapter" / "config.json").read_text()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_trl_sft_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    run_example("trl_sft.py", monkeypatch, "--steps", "2", "--batch-size", "2", "--out", str(tmp_path))
    out = capsys.readouterr().out
    assert "training loss" in out
    assert "visual tokens per stage at the last step: [144, 72, 36, 18]" in out
