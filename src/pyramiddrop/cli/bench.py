"""`pdrop bench`: prefill and decode latency, KV cache and peak memory of a LLaVA-shaped language model with and
without dropping, against the FLOPs prediction; `--train` times a training step, `--conversation` follow-up turns."""

from __future__ import annotations

import argparse
import json

from pyramiddrop.cli.common import UsageError, hub_errors
from pyramiddrop.cli.numbers import NON_NEGATIVE, POSITIVE, TURNS


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser("bench", help="prefill/decode latency, KV cache and peak memory vs FLOPs")
    bench.add_argument("--preset", choices=["tiny", "cpu-small", "llava-1.5-7b", "llava-next-7b"])
    bench.add_argument("--config", help="any HF config (hub id or local directory) instead of a preset")
    bench.add_argument("--visual-tokens", type=POSITIVE)
    bench.add_argument("--text-tokens", type=POSITIVE)
    bench.add_argument(
        "--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--attn", default="sdpa")
    bench.add_argument("--batch-size", type=POSITIVE, default=1)
    bench.add_argument("--repeats", type=POSITIVE, default=5)
    bench.add_argument("--warmup", type=NON_NEGATIVE, default=2)
    bench.add_argument("--decode-steps", type=POSITIVE, default=16)
    bench.add_argument("--threads", type=POSITIVE, help="torch threads per worker (default: torch's choice)")
    bench.add_argument("--train", action="store_true", help="time a training step (forward + backward) instead")
    bench.add_argument("--gradient-checkpointing", action="store_true", help="with --train")
    bench.add_argument(
        "--conversation",
        type=TURNS,
        nargs="+",
        metavar="TURNS",
        help="time follow-up turns of conversations this long (keep, rerank, fresh prefill) instead",
    )
    bench.add_argument("--json", help="write one object per setting here")
    bench.add_argument("--plot", help="write a PNG of latency vs visual tokens here")
    bench.set_defaults(run=run, check=check_flags)


def check_flags(args: argparse.Namespace) -> None:
    if args.preset and args.config:
        raise UsageError("argument --config: give --preset or --config, not both")
    if args.gradient_checkpointing and not args.train:
        raise UsageError("argument --gradient-checkpointing: only applies with --train")
    if args.train and args.plot:
        raise UsageError("argument --plot: --plot draws prefill latency; leave it out with --train")
    if args.conversation and (args.train or args.plot):
        raise UsageError("argument --conversation: times inference turns; leave out --train and --plot")


def run(args: argparse.Namespace) -> None:
    from pyramiddrop.tools import bench

    if args.config:
        with hub_errors("--config", args.config):
            shape = bench.shape_from_config(args.config, args.visual_tokens or 576, args.text_tokens or 64)
    else:
        shape = bench.PRESETS[args.preset or "cpu-small"]
        overrides = {"visual_tokens": args.visual_tokens, "text_tokens": args.text_tokens}
        shape = bench.Shape(**{**bench.asdict(shape), **{k: v for k, v in overrides.items() if v}})
    if args.conversation:
        _bench_conversation(args, shape)
        return
    rows = bench.run_bench(
        shape,
        args.dtype,
        device=args.device,
        attn=args.attn,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_steps=args.decode_steps,
        threads=args.threads,
        train=args.train,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    print(bench.format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    if args.plot:
        bench.plot(rows, shape, args.plot)


def _bench_conversation(args: argparse.Namespace, shape) -> None:
    import torch

    from pyramiddrop.config import PyramidDropConfig
    from pyramiddrop.tools import bench
    from pyramiddrop.tools.bench_conversation import format_conversation, measure_conversation

    if args.threads:
        torch.set_num_threads(args.threads)
    model = bench.build_model(shape, getattr(torch, args.dtype[0]), args.device)
    model.set_attn_implementation(args.attn)
    config = PyramidDropConfig.from_lambda(shape.num_layers, 4, 0.5)
    prompt = bench.prompt_inputs(shape, args.batch_size, args.device)
    rows = [measure_conversation(model, prompt, config, turns, repeats=args.repeats) for turns in args.conversation]
    print(
        f"{shape.num_layers} layers, width {shape.hidden_size}, {shape.visual_tokens} visual tokens, PyramidDrop λ=0.5 "
        f"(4 stages), {args.dtype[0]}, batch {args.batch_size}"
    )
    print(format_conversation(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
