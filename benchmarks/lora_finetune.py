"""LoRA fine-tuning of the embedded model with and without PyramidDrop: step time ratio and accuracy after training.

Two LoRA models from the same base and the same LoRA init train on the same batches (the recipe's VQA stream,
loss on the answers only, `pyramiddrop.synthetic.vqa`), one step of each in turn, alternating which goes first,
so the machine's load falls on both alike. Afterwards the merged models answer the same validation questions
without dropping and with PyramidDrop (lambda 0.5, 4 stages): the shipped model already answers ~99 % without
drops and loses a few points under them, so the question is whether a short LoRA fine-tune with PyramidDrop
adapts it to the drops, and what it costs without them. Accuracies come with 95 % Wilson intervals and
paired differences with bootstrap intervals.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_finetune.py --steps 300 --batch-size 8 \
        --eval-size 2000 --threads 1 --out runs/lora_finetune.json

`--steps 2 --eval-size 20` is a smoke run (seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, is_pyramid_drop_applied, remove_pyramid_drop
from pyramiddrop.synthetic.data import generate, score_answer
from pyramiddrop.synthetic.model import EMBEDDED_MODEL_DIR, load, predict
from pyramiddrop.synthetic.vqa import Phase, VQADataset, collate_vqa
from pyramiddrop.tools.stats import paired_bootstrap_diff, wilson_interval

# LoRA on every linear layer of the language model (the vision tower and projector stay frozen).
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL_DIR, help="a synthetic LLaVA directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4, help="questions per training image")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lam", type=float, default=0.5, help="PyramidDrop lambda (4 stages) for training and eval")
    parser.add_argument("--data-start", type=int, default=2_000_000, help="first index of the training stream")
    parser.add_argument("--eval-size", type=int, default=2000, help="fresh validation questions, all four types")
    parser.add_argument("--eval-seed", type=int, default=101, help="their stream (docs/results.md uses 101)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def lora_model(base, args, pyramid_drop: PyramidDropConfig | None):
    model = copy.deepcopy(base)
    if pyramid_drop is not None:
        apply_pyramid_drop(model, pyramid_drop)
    torch.manual_seed(args.seed)  # the same LoRA init for both
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(model, config).train()


def correctness(model, processor, examples, pyramid_drop: PyramidDropConfig | None) -> list[int]:
    """Per-question 0/1 of greedy answers, with PyramidDrop at inference or without."""
    if is_pyramid_drop_applied(model):
        remove_pyramid_drop(model)
    if pyramid_drop is not None:
        apply_pyramid_drop(model, pyramid_drop)
    answers = predict(model.eval(), processor, examples, batch_size=50)
    return [int(score_answer(answer, example.answer)) for answer, example in zip(answers, examples)]


def summarize(name: str, correct: list[int]) -> dict:
    low, high = wilson_interval(sum(correct), len(correct))
    return {"setting": name, "accuracy": sum(correct) / len(correct), "interval": [low, high]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, processor = load(args.model)
    num_layers = base.config.get_text_config().num_hidden_layers
    pdrop = PyramidDropConfig.from_lambda(num_layers, 4, args.lam)
    models = {"lora": lora_model(base, args, None), "lora+pdrop": lora_model(base, args, pdrop)}
    data = VQADataset(processor, [Phase(args.steps)], args.batch_size, turns=args.turns, start=args.data_start)
    collate = collate_vqa(processor.tokenizer.pad_token_id)
    optimizers, schedules = {}, {}
    for name, model in models.items():
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        schedules[name] = get_cosine_schedule_with_warmup(optimizers[name], max(1, args.steps // 20), args.steps)

    seconds = {name: [] for name in models}
    losses = {name: [] for name in models}
    started = time.time()
    for step in range(args.steps):
        batch = collate([data[step * args.batch_size + i] for i in range(args.batch_size)])
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for name in order:
            model, optimizer = models[name], optimizers[name]
            tick = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedules[name].step()
            optimizer.zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - tick)
            losses[name].append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            recent = {name: round(statistics.fmean(values[-25:]), 4) for name, values in losses.items()}
            print(f"step {step + 1}/{args.steps} loss {recent} ({time.time() - started:.0f} s)", flush=True)

    ratios = [b / a for a, b in zip(seconds["lora"], seconds["lora+pdrop"])]
    timing = {
        "median_step_s": {name: statistics.median(values) for name, values in seconds.items()},
        "step_time_ratio_median_of_pairs": statistics.median(ratios),
        "step_time_ratio_total": sum(seconds["lora+pdrop"]) / sum(seconds["lora"]),
    }
    print(json.dumps(timing, indent=2), flush=True)

    examples = generate(args.eval_size, args.eval_seed)
    results, correct = [], {}
    merged = {"base (no LoRA)": base}
    merged |= {name: model.merge_and_unload() for name, model in models.items()}
    for name, model in merged.items():
        for inference, config in (("no drop", None), (f"PyramidDrop lambda={args.lam}", pdrop)):
            key = f"{name}, {inference}"
            correct[key] = correctness(model, processor, examples, config)
            results.append(summarize(key, correct[key]))
            print(json.dumps(results[-1]), flush=True)
    differences = []
    for inference in ("no drop", f"PyramidDrop lambda={args.lam}"):
        for a, b in (("lora+pdrop", "lora"), ("lora", "base (no LoRA)"), ("lora+pdrop", "base (no LoRA)")):
            diff, low, high = paired_bootstrap_diff(correct[f"{a}, {inference}"], correct[f"{b}, {inference}"])
            differences.append({"inference": inference, "a": a, "b": b, "diff": diff, "interval": [low, high]})
            print(json.dumps(differences[-1]), flush=True)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "pyramid_drop": pdrop.to_dict(),
        "timing": timing,
        "final_loss_last_25": {name: statistics.fmean(values[-25:]) for name, values in losses.items()},
        "accuracy": results,
        "differences": differences,
        "seconds": round(time.time() - started, 1),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
