"""`pdrop generate` on a tiny local model directory (offline, Auto classes)."""

import pytest
from PIL import Image
from tiny_models import save_tiny_llava_with_processor

from pyramiddrop.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llava")
    save_tiny_llava_with_processor(directory)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(directory / "image.png")
    return directory


def run(model_dir, *flags):
    main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--image",
            str(model_dir / "image.png"),
            "--prompt",
            "what ?",
            "--max-new-tokens",
            "4",
            *flags,
        ]
    )


def test_generate_prints_answer_stages_flops_and_time(model_dir, capsys):
    run(model_dir, "--lam", "0.5", "--stages", "3")
    out = capsys.readouterr().out
    assert "answer:" in out
    assert "visual tokens per stage: 64 -> 32 -> 16 (drops after layers [2, 4])" in out
    assert "saved)" in out and "prefill time:" in out


def test_generate_with_explicit_schedule_and_no_drop(model_dir, capsys):
    run(model_dir, "--layer-list", "3", "--ratios", "0.25", "--attn", "eager")
    assert "64 -> 16 (drops after layers [3])" in capsys.readouterr().out
    run(model_dir, "--no-drop")
    assert "visual tokens: 64 (no drop)" in capsys.readouterr().out


def test_generate_rejects_a_bad_schedule_with_a_message(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(model_dir, "--layer-list", "2", "9", "--ratios", "0.5", "0.25")
    assert exit_info.value.code == 2
    assert "layer_list entry 9 is outside [1, 5]" in capsys.readouterr().err
