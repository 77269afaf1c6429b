"""`pdrop generate`: answer one question about one image with PyramidDrop, with the visual tokens of each stage,
the prefill FLOPs (paper convention and end to end) and the prefill time."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pyramiddrop.cli.common import (
    UsageError,
    add_drop_arguments,
    drop_config_from_args,
    load,
    model_depth,
    open_image_argument,
)
from pyramiddrop.cli.numbers import POSITIVE


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    generate = commands.add_parser("generate", parents=parents, help="answer a question about an image")
    generate.add_argument("--image", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument(
        "--follow-up",
        action="append",
        default=[],
        metavar="TEXT",
        help="a further question about the same image, continuing the cache (repeatable)",
    )
    generate.add_argument(
        "--conversation",
        choices=["keep", "rerank"],
        default="keep",
        help="follow-ups see the first question's kept tokens (keep) or re-rank all of them (rerank)",
    )
    generate.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    generate.add_argument(
        "--json", help="write the answer, visual tokens per stage, FLOPs, prefill time and the settings here"
    )
    add_drop_arguments(generate)
    generate.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    image = open_image_argument("--image", args.image)  # before torch: a wrong file is said at once
    import torch

    from pyramiddrop.api import apply_pyramid_drop, get_drop_record
    from pyramiddrop.flops import paper_flops, prefill_flops
    from pyramiddrop.tools.inputs import build_inputs, count_visual_tokens, follow_up_ids

    num_layers = model_depth(args)
    config = drop_config_from_args(args, num_layers)  # checked against the depth before the weights load
    processor, model = load(args)
    text_config = model.config.get_text_config()
    if config is not None:
        apply_pyramid_drop(model, dataclasses.replace(config, conversation=args.conversation))
    inputs = build_inputs(processor, [image], [args.prompt])
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    answer = processor.batch_decode(output.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"answer: {answer.strip()}")

    num_visual = int(count_visual_tokens(model, inputs["input_ids"])[0])
    num_text = int(inputs["attention_mask"][0].sum()) - num_visual

    def visual_tokens_per_stage() -> list[int]:
        if config is None:
            return [num_visual]
        return [len(kept) for kept in get_drop_record(model).kept_visual_indices[0]]

    per_stage = visual_tokens_per_stage()
    if config is not None:
        print(f"visual tokens per stage: {' -> '.join(map(str, per_stage))} (drops after layers {config.layer_list})")
    else:
        print(f"visual tokens: {num_visual} (no drop)")
    history = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
    ]
    follow_ups = []
    for question in args.follow_up:
        try:
            next_turn = follow_up_ids(processor, history, question, output.sequences)
        except ValueError as error:
            raise UsageError(f"argument --follow-up: {error}") from error
        ids = torch.cat([output.sequences, next_turn], 1)
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=output.cache, **options)
        reply = processor.batch_decode(output.sequences[:, ids.shape[1] :], skip_special_tokens=True)[0].strip()
        stages = visual_tokens_per_stage()
        print(f"follow-up: {question}\nanswer: {reply}" + (f" (visual tokens per stage {stages})" if config else ""))
        follow_ups.append({"question": question, "answer": reply, "visual_tokens_per_stage": stages})
        history += [
            {"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]},
        ]
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        prefill_ms = (time.perf_counter() - start) * 1e3
    shape = (num_layers, text_config.hidden_size, text_config.intermediate_size, num_visual)
    paper = paper_flops(*shape, config), paper_flops(*shape)
    e2e = prefill_flops(model.config, num_text, num_visual, config), prefill_flops(model.config, num_text, num_visual)
    print(f"prefill FLOPs (paper convention): {paper[0]:.3e} ({1 - paper[0] / paper[1]:.1%} saved)")
    print(f"prefill FLOPs (end to end):       {e2e[0]:.3e} ({1 - e2e[0] / e2e[1]:.1%} saved)")
    print(f"prefill time: {prefill_ms:.1f} ms")
    if args.json:
        settings = {} if config is None else config.to_dict()
        if config is not None and not args.layer_list:
            settings.update(lam=0.5 if args.lam is None else args.lam, stages=args.stages)
        result = {
            "method": "none" if config is None else config.method,
            "settings": settings,
            "answer": answer.strip(),
            "visual_tokens": num_visual,
            "text_tokens": num_text,
            "visual_tokens_per_stage": per_stage,
            "flops_paper": paper[0],
            "flops_paper_no_drop": paper[1],
            "flops_paper_saved": 1 - paper[0] / paper[1],
            "flops_e2e": e2e[0],
            "flops_e2e_no_drop": e2e[1],
            "flops_e2e_saved": 1 - e2e[0] / e2e[1],
            "prefill_ms": prefill_ms,
            "follow_ups": follow_ups,
            "run": {
                "model": args.model,
                "image": args.image,
                "prompt": args.prompt,
                "follow_up": args.follow_up,
                "conversation": args.conversation,
                "max_new_tokens": args.max_new_tokens,
                "attn": args.attn,
                "dtype": args.dtype,
            },
        }
        Path(args.json).expanduser().write_text(json.dumps(result, indent=2) + "\n")
