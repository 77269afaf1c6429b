"""Second questions about the same image: accuracy under conversation="keep", "rerank" and with no drop.

The first question is the split's (balanced); the model answers it, then a second question about the same
scene (from `extra_questions`, answered from the scene's metadata; its answers are not balanced) continues the
cache. Under "keep" the second question sees the tokens the first question kept; under "rerank" it ranks all
visual tokens again. One conversation at a time (batch 1), so no padding enters the middle of a conversation.

    .venv/bin/python benchmarks/follow_ups.py --seed 101 --limit 2000 [--lam 0.5] [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, remove_pyramid_drop
from pyramiddrop.synthetic.data import build_prompt, extra_questions, generate, score_answer
from pyramiddrop.synthetic.model import require_embedded_model
from pyramiddrop.tools.evaluate import add_paired_differences, format_difference
from pyramiddrop.tools.stats import wilson_interval


def second_questions(seed: int, count: int) -> list[tuple]:
    """(example, second question, its answer, its type): a second question of another type than the first."""
    items = []
    for index, example in enumerate(generate(count, seed)):
        candidates = extra_questions(example.scene, seed, index, 8)
        question, answer, qtype = next((c for c in candidates if c[2] != example.type), candidates[0])
        items.append((example, question, answer, qtype))
    return items


def converse(model, processor, example, second: str, max_new_tokens: int = 3) -> str:
    """Answer the first question, then the second one on the returned cache; returns the second answer."""
    tokenizer = processor.tokenizer
    inputs = processor(images=example.image(), text=build_prompt(example.question), return_tensors="pt")
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    first = model.generate(**inputs, **options)
    sequence = first.sequences
    if int(sequence[0, -1]) != tokenizer.eos_token_id:
        sequence = torch.cat([sequence, torch.tensor([[tokenizer.eos_token_id]])], 1)
    turn = tokenizer(f"USER: {second} ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([sequence, turn], 1)
    cache = getattr(first, "cache", None) or first.past_key_values
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **options)
    return tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="default: the embedded synthetic LLaVA")
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = args.model or str(require_embedded_model())
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    layers = model.config.get_text_config().num_hidden_layers
    config = PyramidDropConfig.from_lambda(layers, 4, args.lam)
    items = second_questions(args.seed, args.limit)
    settings = [
        ("none", None),
        ("keep", replace(config, conversation="keep")),
        ("rerank", replace(config, conversation="rerank")),
    ]
    rows = []
    for name, setting in settings:
        if setting is None:
            if getattr(model, "_pyramid_drop_engine", None) is not None:
                remove_pyramid_drop(model)
        else:
            apply_pyramid_drop(model, setting)
        with torch.no_grad():
            answers = [converse(model, processor, ex, q) for ex, q, _, _ in tqdm(items, desc=name)]
        correct = [score_answer(a, item[2]) for a, item in zip(answers, items)]
        low, high = wilson_interval(sum(correct), len(correct))
        per_type: dict[str, list[bool]] = {}
        for hit, item in zip(correct, items):
            per_type.setdefault(item[3], []).append(hit)
        rows.append(
            {
                "method": name,
                "settings": {} if setting is None else setting.to_dict() | {"lam": args.lam},
                "n": len(correct),
                "accuracy": sum(correct) / len(correct),
                "ci_low": low,
                "ci_high": high,
                "accuracy_per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
                "correct": correct,
            }
        )
    add_paired_differences(rows, "none")
    add_paired_differences(rows, "keep")
    print(f"second questions, {len(items)} conversations (seed {args.seed}), PyramidDrop λ={args.lam} 4 stages")
    for row in rows:
        print(
            f"{row['method']:<7} {100 * row['accuracy']:5.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
            f"  Δ none {format_difference(row['diff_vs_none'], row['diff_vs_none_ci'])}"
            f"  Δ keep {format_difference(row['diff_vs_keep'], row['diff_vs_keep_ci'])}"
            f"  per type {json.dumps({t: round(a, 3) for t, a in row['accuracy_per_type'].items()})}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
