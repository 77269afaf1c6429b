"""`pdrop eval`: a question's row does not depend on the batch size or the order of the questions (random
selection and the noise control draw per question), and a log gets a few plain progress lines, not a bar."""

import io
import json

import pytest
from PIL import Image

from pyramiddrop.cli import main
from pyramiddrop.tools.progress import progress_bar

QUESTIONS = 7


@pytest.fixture(scope="module")
def questions(tiny_model_dir):
    lines = []
    for index in range(QUESTIONS):
        Image.new("RGB", (56, 56), (30 * index, 200 - 25 * index, 90)).save(tiny_model_dir / f"q{index}.png")
        question = " ".join(["what"] * (1 + index % 3)) + " ?"  # prompts of different lengths
        lines.append({"image": f"q{index}.png", "question": question, "answer": "w7", "type": "t"})
    return tiny_model_dir, lines


def _per_question(directory, lines, name, batch_size, tmp_path):
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / f"{name}.per_question.jsonl"
    flags = ["--layer-list", "2", "--ratios", "0.1", "--methods", "random,pdrop", "--noise-control"]
    main(
        [
            "eval",
            "--model",
            str(directory),
            "--data",
            str(data),
            "--batch-size",
            str(batch_size),
            "--per-question",
            str(out),
            *flags,
        ]
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {(r["method"], lines[r["question_index"]]["image"]): (r["answer"], r["kept_per_stage"]) for r in records}


@pytest.mark.slow
def test_rows_do_not_depend_on_batch_size_or_question_order(questions, tmp_path, capsys):
    directory, lines = questions
    alone = _per_question(directory, lines, "alone", 1, tmp_path)
    batched = _per_question(directory, lines, "batched", 4, tmp_path)
    reordered = _per_question(directory, lines[::-1], "reordered", 3, tmp_path)
    assert {method for method, _ in alone} == {"none", "noise", "random", "pdrop"}
    assert batched == alone
    assert reordered == alone


def test_progress_in_a_log_is_a_few_newline_terminated_lines():
    log = io.StringIO()  # not a terminal
    bar = progress_bar(total=400, desc="pdrop eval", unit="q", file=log, log_interval=3600)
    for _ in range(400):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("pdrop eval: 100%") and text.endswith("\n")
