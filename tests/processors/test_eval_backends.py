"""`pdrop eval` on the embedded model answers the same with either image-processor backend.

With torchvision importable, `AutoProcessor` gives the embedded model's `CLIPImageProcessor` (torchvision);
without it, `CLIPImageProcessorPil`. The published numbers (docs/results.md) come from the main environment,
`.venv` (PIL); a user with torchvision gets the other backend. This runs the same `pdrop eval` with this
interpreter (torchvision, `.venv-vllm`) and with `.venv/bin/python` (PIL), each in a subprocess that first prints
the backend `AutoProcessor` picked, and compares every per-question line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision", reason="the torchvision image processors need torchvision: run in .venv-vllm")

pytestmark = pytest.mark.torchvision

REPO = Path(__file__).resolve().parents[2]
MAIN_PYTHON = REPO / ".venv" / "bin" / "python"
EVAL = ["eval", "--limit", "16", "--lam", "0.5", "--batch-size", "8"]  # none, PyramidDrop, FastV, random rows
# Prints the backend AutoProcessor picks, then runs the command line on the arguments.
RUN = (
    "import sys; from transformers import AutoProcessor; from pyramiddrop.synthetic.model import "
    "require_embedded_model; print('backend', type(AutoProcessor.from_pretrained(require_embedded_model())"
    ".image_processor).__name__); from pyramiddrop.cli import main; main(sys.argv[1:])"
)


def per_question(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_answers_are_identical_with_the_pil_and_torchvision_image_processors(tmp_path):
    if not MAIN_PYTHON.exists():
        pytest.skip(f"{MAIN_PYTHON} is absent: ./setup.sh builds the main environment (PIL image processors)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    pil = subprocess.run(
        [str(MAIN_PYTHON), "-c", RUN, *EVAL, "--per-question", str(tmp_path / "pil.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pil.returncode == 0, pil.stderr[-2000:]
    torchvision = subprocess.run(
        [sys.executable, "-c", RUN, *EVAL, "--per-question", str(tmp_path / "torchvision.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert torchvision.returncode == 0, torchvision.stderr[-2000:]
    assert "backend CLIPImageProcessorPil\n" in pil.stdout  # the main environment has no torchvision
    assert "backend CLIPImageProcessor\n" in torchvision.stdout

    expected, got = per_question(tmp_path / "pil.jsonl"), per_question(tmp_path / "torchvision.jsonl")
    assert len(expected) == 4 * 16  # no drop, PyramidDrop, FastV and random at its budget: one line each per question
    assert {line["method"] for line in expected} == {"none", "pdrop", "fastv", "random"}
    assert got == expected  # answers, correctness, kept counts per stage
