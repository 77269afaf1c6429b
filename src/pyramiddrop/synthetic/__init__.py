"""Synthetic shapes VQA, a tiny LLaVA built from Hugging Face classes, and its CPU training recipe.

`data` has no torch dependency: the generator, answer checks, prompts, scoring and JSONL export.
`model` builds / saves / loads the model and processor; `train` is the two-stage training recipe.
"""

from pyramiddrop.synthetic.data import (
    QUESTION_TYPES,
    Example,
    accuracy_by_type,
    answer_question,
    build_prompt,
    compute_answer,
    export_jsonl,
    generate,
    make_example,
    make_split,
    render,
    score_answer,
)

__all__ = [
    "QUESTION_TYPES",
    "Example",
    "accuracy_by_type",
    "answer_question",
    "build_prompt",
    "compute_answer",
    "export_jsonl",
    "generate",
    "make_example",
    "make_split",
    "render",
    "score_answer",
]
