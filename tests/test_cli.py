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


@pytest.fixture(scope="module")
def jsonl(model_dir):
    import json

    lines = []
    for index in range(6):
        Image.new("RGB", (56, 56), (40 * index, 90, 200 - 30 * index)).save(model_dir / f"q{index}.png")
        lines.append(json.dumps({"image": f"q{index}.png", "question": "what ?", "answer": "w7", "type": "t"}))
    path = model_dir / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


EVAL_KEYS = {"method", "settings", "accuracy", "flops_paper", "flops_e2e", "avg_visual_tokens", "prefill_ms", "n"}


def test_eval_writes_the_documented_json(model_dir, jsonl, tmp_path, capsys):
    import json

    out = tmp_path / "eval.json"
    main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(jsonl),
            "--lam",
            "0.5",
            "--stages",
            "3",
            "--position-mode",
            "compact",
            "original",
            "--batch-size",
            "4",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["none", "pdrop", "pdrop"]
    for row in rows:
        assert set(row) >= EVAL_KEYS and row["n"] == 6
    assert rows[1]["settings"] == {
        "layer_list": [2, 4],
        "image_token_ratio_list": [0.5, 0.25],
        "position_mode": "compact",
        "scorer": "pdrop",
        "query": "last",
        "lam": 0.5,
    }
    assert rows[0]["avg_visual_tokens"] == 64
    assert rows[1]["avg_visual_tokens"] == pytest.approx((2 * 64 + 2 * 32 + 2 * 16) / 6)
    assert rows[1]["flops_paper"] < rows[0]["flops_paper"] and rows[1]["flops_e2e"] < rows[0]["flops_e2e"]
    assert "pdrop" in capsys.readouterr().out


def test_eval_at_a_matched_budget_runs_every_method(model_dir, jsonl, tmp_path):
    import json

    out = tmp_path / "budget.json"
    main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(jsonl),
            "--budget",
            "0.5",
            "--methods",
            "pdrop,fastv,random,uniform,dart,pdrop-mean,pdrop-original",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == [
        "none",
        "pdrop",
        "fastv",
        "random",
        "uniform",
        "dart",
        "pdrop-mean",
        "pdrop-original",
    ]
    for row in rows[1:]:
        assert row["avg_visual_tokens"] / 64 == pytest.approx(0.5, rel=0.02)
        assert row["settings"]["budget"] == 0.5


def test_study_and_show_write_pngs(model_dir, jsonl, tmp_path, capsys):
    main(
        [
            "study",
            "--model",
            str(model_dir),
            "--data",
            str(jsonl),
            "--depths",
            "1",
            "3",
            "--ratios",
            "0.5",
            "0.25",
            "--concentration-samples",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    for name in ("study_accuracy.png", "study_concentration.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-10% attention share per layer" in capsys.readouterr().out
    out = tmp_path / "kept.png"
    main(
        [
            "show",
            "--model",
            str(model_dir),
            "--image",
            str(model_dir / "image.png"),
            "--prompt",
            "what ?",
            "--lam",
            "0.5",
            "--stages",
            "3",
            "--out",
            str(out),
        ]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kept tokens per stage: [[64], [32], [16]]" in capsys.readouterr().out


def test_eval_noise_control_row_replaces_the_visual_tokens(model_dir, jsonl, tmp_path):
    import json

    import torch
    from tiny_models import llava_batch, tiny_llava

    from pyramiddrop.evaluate import noise_visual_tokens

    out = tmp_path / "eval.json"
    main(
        ["eval", "--model", str(model_dir), "--data", str(jsonl), "--lam", "0.5", "--noise-control"]
        + ["--json", str(out)]
    )
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["none", "noise", "pdrop"]
    assert rows[1]["settings"] == {"visual_tokens": "gaussian noise"} and rows[1]["avg_visual_tokens"] == 64

    model = tiny_llava()
    batch = llava_batch([(3, 1, 4), (2, 1, 5)])
    with torch.no_grad():
        clean = model(**batch).logits
        with noise_visual_tokens(model):
            noisy = model(**batch).logits
        after = model(**batch).logits
    assert not torch.allclose(clean, noisy, atol=1e-3)  # the image now carries no information
    assert torch.equal(clean, after)  # the hook is gone


def _animation(path, count: int) -> None:
    frames = [Image.new("RGB", (32, 32), (20 * i, 0, 0)) for i in range(count)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


def test_video_frames_are_sampled_evenly_from_an_animation_or_a_folder(tmp_path):
    from pyramiddrop.evaluate import open_video_frames

    _animation(tmp_path / "clip.gif", 10)
    reds = [frame.getpixel((0, 0))[0] for frame in open_video_frames(tmp_path / "clip.gif", 4)]
    assert reds == [0, 60, 120, 180]  # frames 0, 3, 6, 9: first and last included
    assert len(open_video_frames(tmp_path / "clip.gif", 20)) == 10
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (2, 0, 1):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"frame{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert [frame.getpixel((0, 0))[0] for frame in open_video_frames(folder)] == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_video_frames(tmp_path / "missing.gif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no frames"):
        open_video_frames(tmp_path / "empty")


def test_show_video_on_an_image_only_model_says_what_to_use(model_dir, tmp_path):
    _animation(tmp_path / "clip.gif", 4)
    with pytest.raises(SystemExit, match="LlavaProcessor takes no videos; use a video model"):
        main(["show", "--model", str(model_dir), "--video", str(tmp_path / "clip.gif"), "--prompt", "what ?"])
    with pytest.raises(SystemExit):  # --image and --video exclude each other
        main(["show", "--image", "a.png", "--video", str(tmp_path / "clip.gif"), "--prompt", "what ?"])
