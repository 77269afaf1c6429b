"""A local lmms-eval task built from the synthetic VQA set, for offline checks of the `pdrop_hf` model.

    python -m pyramiddrop.integrations.lmms_tasks TASK_DIR --n 200
    lmms-eval --model pdrop_hf --model_args pretrained=DIR,lam=0.5 \\
        --include_path TASK_DIR --tasks pdrop_synthetic_vqa,pdrop_synthetic_vqa_mc

`write_synthetic_task` exports the questions with `synthetic.export_jsonl` and writes two task YAMLs next to
them: `pdrop_synthetic_vqa` (generation, exact match after `normalize_answer`, the metric of `pdrop eval`) and
`pdrop_synthetic_vqa_mc` (multiple choice over the question type's answers, scored by log-likelihood). The
YAMLs name the functions below by their module path, so the task directory holds data only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from pyramiddrop.synthetic.data import ANSWERS, export_jsonl, make_split, score_answer

TASK = "pdrop_synthetic_vqa"
MC_TASK = "pdrop_synthetic_vqa_mc"
_FUNCTIONS = "pyramiddrop.integrations.lmms_tasks"

_COMMON = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {{split}}.jsonl
test_split: test
doc_to_visual: !function {_FUNCTIONS}.doc_to_visual
doc_to_text: !function {_FUNCTIONS}.doc_to_text
metadata:
  version: 1.0
"""

_GENERATION_YAML = (
    f"task: {TASK}\n"
    + _COMMON
    + f"""output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function {_FUNCTIONS}.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
)

_MC_YAML = (
    f"task: {MC_TASK}\n"
    + _COMMON
    + f"""output_type: multiple_choice
doc_to_target: answer
doc_to_choice: !function {_FUNCTIONS}.doc_to_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
)


def write_synthetic_task(directory: str | Path, n: int = 200, split: str = "test") -> Path:
    """Export the first `n` questions of a synthetic split and the two task YAMLs into `directory`.

    Image paths in the JSONL are made absolute: lmms-eval hands documents to `doc_to_visual` without the file
    they came from. The same JSONL also works as `pdrop eval --data`.
    """
    directory = Path(directory).resolve()
    path = export_jsonl(make_split(split, n), directory, name=split)
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record["image"] = str(directory / record["image"])
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    (directory / f"{TASK}.yaml").write_text(_GENERATION_YAML.format(split=split))
    (directory / f"{MC_TASK}.yaml").write_text(_MC_YAML.format(split=split))
    return directory


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The bare question: the synthetic model was trained without instructions around it (as `pdrop eval`)."""
    return doc["question"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(ANSWERS[doc["type"]])


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match after `normalize_answer`: the metric of `pdrop eval`."""
    return {"exact_match": float(score_answer(results[0], doc["answer"]))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write the JSONL, images and task YAMLs (the --include_path)")
    parser.add_argument("--n", type=int, default=200, help="number of questions (default 200)")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    args = parser.parse_args(argv)
    directory = write_synthetic_task(args.directory, args.n, args.split)
    print(f"wrote {TASK} and {MC_TASK} ({args.n} questions); use --include_path {directory}")


if __name__ == "__main__":
    main()
