"""`pdrop generate --follow-up` and `pdrop bench --conversation` (the embedded model and the tiny bench preset)."""

import json

import pytest

from pyramiddrop.cli import main
from pyramiddrop.synthetic.data import ANSWERS, make_split


@pytest.mark.parametrize("conversation", ["keep", "rerank"])
def test_generate_follow_ups_continue_the_conversation(conversation, tmp_path, capsys):
    example = next(e for e in make_split("test", 20) if e.type == "color")
    example.image().save(tmp_path / "scene.png")
    out = tmp_path / "out.json"
    main(
        ["generate", "--image", str(tmp_path / "scene.png"), "--prompt", example.question, "--lam", "0.5"]
        + ["--follow-up", "how many squares are there?", "--follow-up", "is there a red square?"]
        + ["--conversation", conversation, "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert printed.count("follow-up:") == 2
    result = json.loads(out.read_text())
    assert [turn["question"] for turn in result["follow_ups"]] == [
        "how many squares are there?",
        "is there a red square?",
    ]
    assert result["follow_ups"][0]["answer"] in ANSWERS["count"] and result["follow_ups"][1]["answer"] in ("yes", "no")
    assert all(turn["visual_tokens_per_stage"] == [144, 72, 36, 18] for turn in result["follow_ups"])
    assert result["run"]["conversation"] == conversation


def test_follow_up_refuses_a_template_that_rewrites_earlier_turns(generate, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate("--follow-up", "and now?")
    assert exit_info.value.code == 2
    assert "chat template rewrites earlier turns" in capsys.readouterr().err


def test_bench_conversation_reports_turn_times_and_stored_hidden_states(tmp_path):
    out = tmp_path / "conversation.json"
    main(
        ["bench", "--preset", "tiny", "--conversation", "2", "3", "--repeats", "1", "--dtype", "float32"]
        + ["--json", str(out)]
    )
    rows = json.loads(out.read_text())
    assert [row["turns"] for row in rows] == [2, 3]
    for row in rows:
        assert min(row["keep_turn_ms"], row["rerank_turn_ms"], row["fresh_prefill_turn_ms"]) > 0
        # rerank stores one float32 hidden state of width 64 per token the model has seen (the last answer
        # token was never fed), and keep or a fresh prefill stores none
        assert row["rerank_stored_bytes"] == (row["conversation_tokens"] - 1) * 64 * 4
        assert row["keep_stored_bytes"] == 0 and row["fresh_prefill_stored_bytes"] == 0
    assert rows[1]["conversation_tokens"] == rows[0]["conversation_tokens"] + 16 + 8
