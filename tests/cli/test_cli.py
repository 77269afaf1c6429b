"""`pdrop generate` on a tiny local model directory (offline, Auto classes)."""

import pytest
from PIL import Image

from pyramiddrop.cli import main


def test_generate_prints_answer_stages_flops_and_time(generate, capsys):
    generate("--lam", "0.5", "--stages", "3")
    out = capsys.readouterr().out
    assert "answer:" in out
    assert "visual tokens per stage: 64 -> 32 -> 16 (drops after layers [2, 4])" in out
    assert "saved)" in out and "prefill time:" in out


def test_generate_with_explicit_schedule_and_no_drop(generate, capsys):
    generate("--layer-list", "3", "--ratios", "0.25", "--attn", "eager")
    assert "64 -> 16 (drops after layers [3])" in capsys.readouterr().out
    generate("--no-drop")
    assert "visual tokens: 64 (no drop)" in capsys.readouterr().out


def test_generate_rejects_a_bad_schedule_with_a_message(generate, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate("--layer-list", "2", "9", "--ratios", "0.5", "0.25")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "pdrop generate: error: argument --layer-list: layer 9 is outside the model, which has 6 decoder layers; "
        "give layers from 0 to 5 (a drop after layer l needs a layer l+1)\n"
    )


EVAL_KEYS = {"method", "settings", "accuracy", "flops_paper", "flops_e2e", "avg_visual_tokens", "prefill_ms", "n"}


def test_eval_writes_the_documented_json(tiny_model_dir, questions_jsonl, tmp_path, capsys):
    import json

    out = tmp_path / "eval.json"
    main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(questions_jsonl),
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
    assert [row["method"] for row in rows] == ["none", "pdrop", "pdrop", "fastv", "random"]
    for row in rows:
        assert set(row) >= EVAL_KEYS and row["n"] == 6
    # the default baselines run at the budget of the first PyramidDrop row and are compared with it
    budget = rows[1]["avg_visual_tokens"] / 64
    for row in rows[3:]:
        assert row["settings"]["budget"] == pytest.approx(budget, abs=1e-4) and row["settings"]["matched_to_lam"] == 0.5
        assert row["avg_visual_tokens"] == pytest.approx(rows[1]["avg_visual_tokens"], rel=0.02)
        assert row["diff_vs_pdrop"] is not None
    assert rows[3]["settings"]["layer_list"] == [2] and rows[3]["settings"]["position_mode"] == "original"
    assert rows[4]["settings"]["scorer"] == "random"
    assert {k: v for k, v in rows[4]["settings"].items() if k not in ("scorer", "budget", "matched_to_lam")} == {
        k: v for k, v in rows[1]["settings"].items() if k not in ("scorer", "lam")
    }
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


def test_eval_at_a_matched_budget_runs_every_method(tiny_model_dir, questions_jsonl, tmp_path, capsys):
    import json

    out = tmp_path / "budget.json"
    main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(questions_jsonl),
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
    # with --budget every row is also compared with PyramidDrop (the pdrop row itself: None)
    assert rows[1]["diff_vs_pdrop"] is None and rows[1]["diff_vs_none"] is not None
    for row in rows[:1] + rows[2:]:
        assert row["diff_vs_pdrop"] == pytest.approx(row["accuracy"] - rows[1]["accuracy"])
        assert len(row["diff_vs_pdrop_ci"]) == 2 and 0 <= row["mcnemar_p_vs_pdrop"] <= 1
    assert "Δ none" in capsys.readouterr().out.splitlines()[1]


def test_study_and_show_write_pngs(tiny_model_dir, questions_jsonl, tmp_path, capsys):
    main(
        [
            "study",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(questions_jsonl),
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
    for name in ("study_accuracy.png", "study_concentration.png", "study_profile.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-10% attention share per layer" in capsys.readouterr().out
    out = tmp_path / "kept.png"
    main(
        [
            "show",
            "--model",
            str(tiny_model_dir),
            "--image",
            str(tiny_model_dir / "image.png"),
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


def test_eval_noise_control_row_replaces_the_visual_tokens(tiny_model_dir, questions_jsonl, tmp_path):
    import json

    import torch
    from tiny_models import llava_batch, tiny_llava

    from pyramiddrop.tools.evaluate import noise_visual_tokens

    out = tmp_path / "eval.json"
    main(
        ["eval", "--model", str(tiny_model_dir), "--data", str(questions_jsonl), "--lam", "0.5", "--noise-control"]
        + ["--baselines", "none", "--json", str(out)]
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
    from pyramiddrop.tools.inputs import open_video_frames

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


def test_show_video_on_an_image_only_model_says_what_to_use(tiny_model_dir, tmp_path, capsys):
    _animation(tmp_path / "clip.gif", 4)
    with pytest.raises(SystemExit) as exit_info:
        main(["show", "--model", str(tiny_model_dir), "--video", str(tmp_path / "clip.gif"), "--prompt", "what ?"])
    assert exit_info.value.code == 2
    assert "argument --video: LlavaProcessor takes no videos; use a video model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --image and --video exclude each other
        main(["show", "--image", "a.png", "--video", str(tmp_path / "clip.gif"), "--prompt", "what ?"])


@pytest.fixture(scope="module")
def matched_jsonl(tiny_model_dir):
    """12 questions whose answers are the tiny model's own answers without drop: no drop scores 100 %, and a
    drop scores what it keeps of them (a random model has no accuracy to lose otherwise)."""
    import json

    from pyramiddrop.settings import Setting
    from pyramiddrop.tools.evaluate import evaluate
    from pyramiddrop.tools.inputs import load_model

    images = []
    for index in range(12):
        image = Image.new("RGB", (56, 56), (20 * index, 255 - 20 * index, (70 * index) % 256))
        image.save(tiny_model_dir / f"m{index}.png")
        images.append(image)
    processor, model = load_model(str(tiny_model_dir))
    examples = [{"image": image, "question": "what ?", "answer": "", "type": "t"} for image in images]
    _, answers = evaluate(model, processor, examples, [Setting("none", None)], progress=False)
    path = tiny_model_dir / "matched.jsonl"
    lines = [json.dumps({"image": f"m{i}.png", "question": "what ?", "answer": a}) for i, a in enumerate(answers[0])]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_prints_intervals_and_paired_differences(tiny_model_dir, matched_jsonl, tmp_path, capsys):
    import json

    from pyramiddrop.tools.evaluate import excludes_zero, format_difference
    from pyramiddrop.tools.stats import mcnemar_exact, paired_bootstrap_diff, wilson_interval

    out = tmp_path / "eval.json"
    main(
        ["eval", "--model", str(tiny_model_dir), "--data", str(matched_jsonl), "--lam", "0.5", "0.1", "--stages", "2"]
        + ["--position-mode", "original", "--baselines", "none", "--json", str(out)]
    )
    rows = json.loads(out.read_text())
    none, *drops = rows
    assert none["correct"] == [1] * 12 and none["accuracy"] == 1.0
    assert (none["ci_low"], none["ci_high"]) == wilson_interval(12, 12) and none["ci_high"] == 1.0
    assert none["accuracy_per_type_ci"] == {"all": list(wilson_interval(12, 12))}
    assert none["diff_vs_none"] is None and none["diff_vs_none_ci"] is None and none["mcnemar_p_vs_none"] is None
    assert "diff_vs_pdrop" not in none  # only with --budget
    assert drops[1]["accuracy"] < 1.0  # keeping 10 % after layer 3 changes some of the tiny model's answers
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "12 questions, the same for every row"
    assert lines[3].startswith("none ") and f"[{100 * wilson_interval(12, 12)[0]:.1f}, 100.0]" in lines[3]
    for row, line in zip(drops, lines[4:6]):
        correct = row["correct"]
        assert len(correct) == 12 and sum(correct) / 12 == row["accuracy"]
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(sum(correct), 12))
        diff, low, high = paired_bootstrap_diff(correct, none["correct"], 2000, 0)
        assert row["diff_vs_none"] == pytest.approx(row["accuracy"] - 1.0) == pytest.approx(diff)
        assert row["diff_vs_none_ci"] == pytest.approx([low, high])
        assert row["mcnemar_p_vs_none"] == mcnemar_exact(correct, none["correct"])
        # the table's Δ column: the same numbers, marked * exactly when the interval excludes 0
        assert format_difference(row["diff_vs_none"], row["diff_vs_none_ci"]) in line
        assert line.rstrip().split()[-2].endswith("*") == excludes_zero(row["diff_vs_none_ci"])
        assert line.split()[-1] == f"{row['mcnemar_p_vs_none']:.3g}"
    assert "Wilson" in lines[-1] and "2000 resamples" in lines[-1]


def study(model_dir, data, out, *flags):
    main(["study", "--model", str(model_dir), "--data", str(data), "--out", str(out), *flags])


def test_study_depth_profile_with_random_selection(tiny_model_dir, matched_jsonl, tmp_path, capsys):
    import json

    from pyramiddrop.tools.evaluate import format_difference
    from pyramiddrop.tools.study import horizon_layer

    flags = ["--method", "random", "--layers", "1", "3", "5", "--ratios", "0.5", "0.1", "--concentration-samples", "0"]
    study(tiny_model_dir, matched_jsonl, tmp_path / "a", *flags)
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads((tmp_path / "a" / "study.json").read_text())
    assert summary["method"] == "random" and summary["position_mode"] == "original" and summary["n"] == 12
    assert summary["concentration"] is None and not (tmp_path / "a" / "study_concentration.png").exists()
    assert (tmp_path / "a" / "study_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows, profile = summary["rows"], summary["profile"]
    assert {row["settings"]["scorer"] for row in rows[1:]} == {"random"}
    assert {row["settings"]["position_mode"] for row in rows[1:]} == {"original"}
    assert [(e["keep_ratio"], e["depth"]) for e in profile] == [(r, d) for r in (0.1, 0.5) for d in (1, 3, 5)]
    by_setting = {(row["settings"]["depth"], row["settings"]["keep_ratio"]): row for row in rows[1:]}
    for entry in profile:
        row = by_setting[entry["depth"], entry["keep_ratio"]]
        assert entry["loss"] == pytest.approx(1.0 - row["accuracy"])  # no drop scores 100 % here
        assert entry["loss_ci"] == pytest.approx([-row["diff_vs_none_ci"][1], -row["diff_vs_none_ci"][0]])
    assert summary["horizon"] == {"keep_ratio": 0.1, "layer": horizon_layer(profile, 0.1)}
    assert summary["horizon_per_ratio"][0] == {"keep_ratio": 0.5, "layer": horizon_layer(profile, 0.5)}

    assert lines[0] == "no drop: 100.0% [75.8, 100.0] on 12 questions"  # Wilson 12/12: 12 / (12 + z²)
    assert "random selection, original positions" in lines[1]
    assert lines[2].split() == ["depth", "keep", "0.5", "keep", "0.1"]
    cells = {(e["depth"], e["keep_ratio"]): e for e in profile}
    for depth, line in zip((1, 3, 5), lines[3:6]):
        expected = f"{depth:>5}"
        for ratio in (0.5, 0.1):
            entry = cells[depth, ratio]
            expected += f"   {entry['accuracy']:>6.1%} {format_difference(entry['loss'], entry['loss_ci']):<23}"
        assert line == expected.rstrip()
    layer = summary["horizon"]["layer"]
    assert lines[6].startswith(f"horizon layer (keep 0.1): {'none' if layer is None else layer}")

    study(tiny_model_dir, matched_jsonl, tmp_path / "b", *flags)  # seeded: the same answers again
    again = json.loads((tmp_path / "b" / "study.json").read_text())
    assert [row["correct"] for row in again["rows"]] == [row["correct"] for row in rows]
    capsys.readouterr()


def test_study_rejects_an_unknown_method_listing_the_registered_ones(tiny_model_dir, questions_jsonl, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study(tiny_model_dir, questions_jsonl, "unused", "--method", "nope")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --method: invalid choice: 'nope'" in error
    assert all(f"'{name}'" in error for name in ("dart", "pdrop", "random", "uniform"))
    with pytest.raises(SystemExit) as exit_info:
        study(tiny_model_dir, questions_jsonl, "unused", "--ratios", "0.5", "0.1", "--horizon-ratio", "0.3")
    assert exit_info.value.code == 2
    assert "argument --horizon-ratio: 0.3 is not one of --ratios [0.5, 0.1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # drops only before layer 0: no depth to study
        study(tiny_model_dir, questions_jsonl, "unused", "--method", "vispruner")
    assert exit_info.value.code == 2
    assert "argument --method: method 'vispruner' drops once, before the language model" in capsys.readouterr().err


def test_eval_rejects_an_unknown_baseline_before_loading(questions_jsonl, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "does-not-matter", "--data", str(questions_jsonl), "--baselines", "fastv,nope"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "argument --baselines: unknown baseline 'nope'; choose from fastv, dart, vscan, vispruner, conditional-dpp, divprune, pivot-duplication, random, sparsevlm, sparsevlm-norecycle, uniform, visionzip or 'none'"
        in error
    )
