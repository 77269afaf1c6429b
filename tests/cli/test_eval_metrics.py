"""`pdrop eval`'s loyalty metrics, per-question output and explicit schedules (tiny local model, offline)."""

import json
import math

import pytest
import torch

from pyramiddrop.cli import main
from pyramiddrop.tools.evaluate import _loyalty


def _eval(model_dir, data, tmp_path, *flags):
    out = tmp_path / "rows.json"
    main(["eval", "--model", str(model_dir), "--data", str(data), "--batch-size", "4", "--json", str(out), *flags])
    return json.loads(out.read_text())


def test_loyalty_by_hand():
    reference = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), -1)
    same = _loyalty(["a", "b"], ["a", "b"], reference, reference)
    assert same["loyalty"] == 1.0 and same["first_token_agreement"] == 1.0 and same["first_token_kl"] == 0.0
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]]), -1)
    result = _loyalty(["a", "c"], ["a", "b"], other, reference)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), -1)
    q = torch.softmax(torch.tensor([0.0, 2.0, 0.0]), -1)
    expected_kl = float((p * (p.log() - q.log())).sum()) / 2  # the second question's distributions are equal
    assert result["loyalty"] == 0.5 and result["first_token_agreement"] == 0.5
    assert result["first_token_kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert 0 < result["loyalty_ci"][0] < 0.5 < result["loyalty_ci"][1] < 1


def test_eval_rows_carry_loyalty_and_the_per_question_file(tiny_model_dir, questions_jsonl, tmp_path, capsys):
    per_question = tmp_path / "questions.jsonl"
    rows = _eval(
        tiny_model_dir, questions_jsonl, tmp_path, "--lam", "0.3", "--stages", "3", "--per-question", str(per_question)
    )
    none, *dropped = rows
    assert none["loyalty"] == 1.0 and none["first_token_kl"] == 0.0 and none["kept_per_stage"] == [[]] * 6
    for row in dropped:
        assert 0.0 <= row["loyalty"] <= 1.0 and row["first_token_kl"] >= 0.0 and not math.isnan(row["first_token_kl"])
        assert all(kept == [64, 19, 5] for kept in row["kept_per_stage"]) or row["method"] != "pdrop"
    assert any(row["first_token_kl"] > 0 for row in dropped)  # dropping 70 % of a random model's tokens moves it
    lines = [json.loads(line) for line in per_question.read_text().splitlines()]
    assert len(lines) == len(rows) * 6
    for row_index, row in enumerate(rows):
        mine = lines[row_index * 6 : (row_index + 1) * 6]
        assert [line["correct"] for line in mine] == [bool(c) for c in row["correct"]]
        assert sum(line["same_as_no_drop"] for line in mine) / 6 == pytest.approx(row["loyalty"])
        assert {line["method"] for line in mine} == {row["method"]}
    assert "loyal" in capsys.readouterr().out


def test_eval_takes_an_explicit_schedule_for_several_methods(tiny_model_dir, questions_jsonl, tmp_path):
    rows = _eval(
        tiny_model_dir, questions_jsonl, tmp_path, "--layer-list", "2", "4", "--ratios", "0.5", "0.25",
        "--methods", "pdrop,random,pdrop-mean", "--fastv-layer", "3", "--fastv-ratio", "0.2",
    )  # fmt: skip
    assert [row["method"] for row in rows] == ["none", "pdrop", "random", "pdrop-mean", "fastv"]
    for row in rows[1:4]:
        assert row["settings"]["layer_list"] == [2, 4] and row["settings"]["image_token_ratio_list"] == [0.5, 0.25]
        assert all(kept == [64, 32, 16] for kept in row["kept_per_stage"])
    assert rows[3]["settings"]["query"] == "instruction_mean"
    assert rows[4]["settings"]["layer_list"] == [3] and rows[4]["settings"]["position_mode"] == "original"
    assert all(kept == [64, 12] for kept in rows[4]["kept_per_stage"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--layer-list", "2"], "--layer-list and --ratios go together"),
        (["--fastv-layer", "2"], "--fastv-layer K and --fastv-ratio R go together"),
        (["--layer-list", "2", "--ratios", "0.5", "--budget", "0.3"], "give a budget or an explicit schedule"),
        (["--layer-list", "2", "--ratios", "0.5", "--methods", "fastv"], "fastv is a schedule"),
        (["--layer-list", "2", "4", "--ratios", "0.5"], "give one keep ratio per drop layer"),
        (["--layer-list", "2", "--ratios", "1.5"], "argument --ratios: 1.5 is out of range; give a fraction in (0, 1]"),
        (["--methods", "divprune,nope", "--budget", "0.3"], "argument --methods: unknown method 'nope'"),
        (["--methods", "divprune"], "argument --methods: goes with --budget or --layer-list/--ratios"),
        (["--layer-list", "0", "2", "--ratios", "0.5", "0.25", "--methods", "pool"], "method 'pool' averages"),
    ],
)
def test_bad_schedule_flags_fail_at_parsing(flags, message, tiny_model_dir, questions_jsonl, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _eval(tiny_model_dir, questions_jsonl, tmp_path, *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_runs_the_pre_llm_methods_at_a_budget(tiny_model_dir, questions_jsonl, tmp_path):
    rows = _eval(
        tiny_model_dir, questions_jsonl, tmp_path, "--budget", "0.25", "--methods", "pdrop,divprune,visionzip,pool"
    )
    assert [row["method"] for row in rows] == ["none", "pdrop", "divprune", "visionzip", "pool"]
    for row in rows[2:]:  # one drop before layer 0 keeping a quarter of the 64 tokens: every layer sees 16
        assert row["settings"]["layer_list"] == [0] and row["avg_visual_tokens"] == 16
        assert all(kept == [64, 16] for kept in row["kept_per_stage"])
        assert row["diff_vs_pdrop_ci"] is not None


def test_eval_without_answers_reports_loyalty_only(tiny_model_dir, questions_jsonl, tmp_path, capsys):
    unlabelled = tmp_path / "prompts.jsonl"
    lines = [json.loads(line) for line in questions_jsonl.read_text().splitlines()]
    for line in lines:
        line.pop("answer")
        line["image"] = str((questions_jsonl.parent / line["image"]).resolve())
    unlabelled.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    per_question = tmp_path / "questions.jsonl"
    labelled = _eval(
        tiny_model_dir, questions_jsonl, tmp_path, "--lam", "0.3", "--stages", "3", "--baselines", "random"
    )
    rows = _eval(
        tiny_model_dir, unlabelled, tmp_path, "--lam", "0.3", "--stages", "3", "--baselines", "random",
        "--per-question", str(per_question),
    )  # fmt: skip
    assert "has no answers: label-free" in capsys.readouterr().out
    for row, reference in zip(rows, labelled):
        assert row["accuracy"] is None and row["correct"] is None and row.get("diff_vs_none") is None
        for key in ("loyalty", "first_token_agreement", "first_token_kl"):  # the same as with answers
            assert row[key] == pytest.approx(reference[key])
    assert all(json.loads(line)["correct"] is None for line in per_question.read_text().splitlines())


def test_a_jsonl_with_answers_on_some_lines_only_says_which(tiny_model_dir, questions_jsonl, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    lines = [json.loads(line) for line in questions_jsonl.read_text().splitlines()]
    lines[2].pop("answer")
    for line in lines:
        line["image"] = str((questions_jsonl.parent / line["image"]).resolve())
    mixed.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        _eval(tiny_model_dir, mixed, tmp_path)
    assert exit_info.value.code == 2
    assert f"{mixed}:3: no answer, but line 1 has one" in capsys.readouterr().err
