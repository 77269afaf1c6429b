"""`pdrop bench`: prefill latency, decode latency, KV cache and peak memory against the FLOPs prediction.

The language model of a LLaVA-shaped model with random weights is measured (the vision encoder costs the
same with or without dropping). Every setting runs in a fresh process (`bench_measure`), so peak memory is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

from pyramiddrop.budget import average_visual_fraction, fastv_schedule
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.flops import prefill_flops
from pyramiddrop.settings import describe_config

IMAGE_TOKEN_ID = 3


@dataclass
class Shape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    visual_tokens: int
    text_tokens: int


PRESETS = {
    "tiny": Shape(4, 64, 128, 4, 2, 256, 64, 16),  # for tests
    "cpu-small": Shape(24, 1024, 2816, 16, 16, 32064, 576, 64),  # LLaVA-1.5-like, scaled to a CPU
    "llava-1.5-7b": Shape(32, 4096, 11008, 32, 32, 32064, 576, 64),
    "llava-next-7b": Shape(32, 4096, 11008, 32, 32, 32064, 2880, 64),
}


def shape_from_config(name: str, visual_tokens: int, text_tokens: int) -> Shape:
    """Any HF config (hub id or local directory): its language model's shape."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(name).get_text_config()
    heads = text.num_attention_heads
    return Shape(
        text.num_hidden_layers,
        text.hidden_size,
        text.intermediate_size,
        heads,
        getattr(text, "num_key_value_heads", heads),
        text.vocab_size,
        visual_tokens,
        text_tokens,
    )


def build_model(shape: Shape, dtype: torch.dtype, device: str):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = build_text_config(shape)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    with torch.device(device):  # built in `dtype` on `device`: a 7B shape never exists in float32
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def settings_for(shape: Shape) -> list[tuple[str, PyramidDropConfig | None]]:
    """No drop, PyramidDrop λ=0.5 with 4 stages, and FastV at PyramidDrop's average visual-token budget."""
    pdrop = PyramidDropConfig.from_lambda(shape.num_layers, 4, 0.5)
    budget = average_visual_fraction(pdrop, shape.num_layers, shape.visual_tokens)
    return [("none", None), ("pdrop", pdrop), ("fastv", fastv_schedule(budget, shape.num_layers, shape.visual_tokens))]


ANSWER_TOKENS = 8  # training steps: the loss is on the last 8 text tokens, an answer after the question


def prompt_inputs(shape: Shape, batch_size: int, device: str, train: bool = False) -> dict:
    """A prompt of `shape`: half the text, the visual placeholders, the other half (answer labels with `train`)."""
    half = shape.text_tokens // 2
    row = [1] + [10] * (half - 1) + [IMAGE_TOKEN_ID] * shape.visual_tokens + [11] * (shape.text_tokens - half)
    input_ids = torch.tensor([row] * batch_size, device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if train:
        labels = torch.full_like(input_ids, -100)
        labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
        inputs["labels"] = labels
    return inputs


def setting_rows(
    shape: Shape,
    settings: list[tuple[str, PyramidDropConfig | None]],
    latencies: list[dict],
    memories: list[dict],
    train: bool = False,
    **run: object,
) -> list[dict]:
    """One row per setting: the measurements, the schedule, the FLOPs and the speed-ups against the first
    setting (no drop). `run` (dtype, device, attn, batch_size, ...) is copied into every row."""
    text_config, rows = build_text_config(shape), []
    for (method, config), latency, memory in zip(settings, latencies, memories):
        row = {
            "method": method,
            "settings": {} if config is None else describe_config(config),
            **run,
            "visual_tokens": shape.visual_tokens,
            "text_tokens": shape.text_tokens,
            "avg_visual_tokens": average_visual_fraction(config, shape.num_layers, shape.visual_tokens)
            * shape.visual_tokens,
            "flops_e2e": prefill_flops(text_config, shape.text_tokens, shape.visual_tokens, config),
            **latency,
            **memory,
        }
        if train:
            row |= {"train_step_ms": row.pop("prefill_ms")}
        key = "train_step_ms" if train else "prefill_ms"
        baseline = rows[0] if rows else row
        row["speedup"] = baseline[key] / row[key]
        row["predicted_speedup"] = baseline["flops_e2e"] / row["flops_e2e"]
        row["measured_over_predicted"] = row["speedup"] / row["predicted_speedup"]
        rows.append(row)
    return rows


def run_bench(
    shape: Shape,
    dtypes: list[str],
    device: str = "cpu",
    attn: str = "sdpa",
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    decode_steps: int = 8,
    threads: int | None = None,
    settings: list[tuple[str, PyramidDropConfig | None]] | None = None,
    progress: bool = True,
    train: bool = False,
    gradient_checkpointing: bool = False,
) -> list[dict]:
    """With `train`, a forward + backward pass with a loss on the answer tokens replaces the prefill: the
    rows then carry `train_step_ms` and training peak memory instead of prefill, decode and KV numbers."""
    settings = settings or settings_for(shape)
    rows = []
    with tempfile.TemporaryDirectory() as weights_dir:
        if device == "cpu":  # build the random model once; workers load it (fast) instead of re-initialising
            build_model(shape, torch.float32, "cpu").save_pretrained(weights_dir)
        for dtype in dtypes:
            job = {
                "shape": asdict(shape),
                "device": device,
                "dtype": dtype,
                "attn": attn,
                "batch_size": batch_size,
                "repeats": repeats,
                "warmup": warmup,
                "decode_steps": decode_steps,
                "threads": threads,
                "weights": weights_dir if device == "cpu" else None,
                "configs": [config.to_dict() if config else None for _, config in settings],
                "train": train,
                "gradient_checkpointing": gradient_checkpointing,
            }
            if progress:
                print(
                    f"  {'training step' if train else 'prefill'} latency, {dtype}, {len(settings)} settings "
                    "interleaved ...",
                    file=sys.stderr,
                    flush=True,
                )
            latencies, memories = _run_worker("latency", job), []
            for method, config in settings:
                if progress:
                    print(f"  memory, {method} {dtype} (fresh process) ...", file=sys.stderr, flush=True)
                memories.append(_run_worker("memory", {**job, "config": config.to_dict() if config else None}))
            extra = {"gradient_checkpointing": gradient_checkpointing} if train else {}
            run = {"dtype": dtype, "device": device, "attn": attn, "batch_size": batch_size, **extra}
            rows += setting_rows(shape, settings, latencies, memories, train, **run)
    return rows


def build_text_config(shape: Shape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=max(4096, 2 * (shape.visual_tokens + shape.text_tokens)),
    )


def _run_worker(kind: str, job: dict):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    completed = subprocess.run(
        [sys.executable, "-m", "pyramiddrop.tools.bench_measure", kind, json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    if "train_step_ms" in rows[0]:
        header = (
            f"{'method':<7} {'dtype':<9} {'step ms':>9} {'time ratio':>10} {'predicted':>9} {'meas/pred':>9} "
            f"{'rank %':>7} {'peak MB':>8} {'peak-res MB':>11}"
        )
        lines = [header, "-" * len(header)]
        for row in rows:
            lines.append(
                f"{row['method']:<7} {row['dtype']:<9} {row['train_step_ms']:>9.1f} {1 / row['speedup']:>10.3f} "
                f"{1 / row['predicted_speedup']:>9.3f} {row['measured_over_predicted']:>9.2f} "
                f"{100 * row['rank_share']:>7.2f} {row['peak_mem_mb']:>8.0f} {row['peak_over_resident_mb']:>11.0f}"
            )
        return "\n".join(lines)
    header = (
        f"{'method':<7} {'dtype':<9} {'prefill ms':>10} {'speedup':>8} {'predicted':>9} {'meas/pred':>9} "
        f"{'rank %':>7} {'decode ms/tok':>13} {'KV MB':>7} {'peak MB':>8} {'peak-res MB':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:<7} {row['dtype']:<9} {row['prefill_ms']:>10.1f} {row['speedup']:>8.2f} "
            f"{row['predicted_speedup']:>9.2f} {row['measured_over_predicted']:>9.2f} {100 * row['rank_share']:>7.2f} "
            f"{row['decode_ms_per_token']:>13.2f} {row['kv_cache_bytes'] / 2**20:>7.1f} {row['peak_mem_mb']:>8.0f} "
            f"{row['peak_over_resident_mb']:>11.0f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], shape: Shape, path: str) -> None:
    """Prefill latency against average visual tokens per layer, with the line the FLOPs predict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text_config = build_text_config(shape)
    tokens = [round(shape.visual_tokens * step / 20) for step in range(21)]
    flops = [prefill_flops(text_config, shape.text_tokens, n) for n in tokens]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for dtype in sorted({row["dtype"] for row in rows}):
        subset = [row for row in rows if row["dtype"] == dtype]
        base = next(row for row in subset if row["method"] == "none")
        per_flop = base["prefill_ms"] / base["flops_e2e"]
        (line,) = axis.plot(tokens, [per_flop * f for f in flops], "--", alpha=0.6, label=f"FLOPs-predicted, {dtype}")
        for row in subset:
            axis.scatter(row["avg_visual_tokens"], row["prefill_ms"], color=line.get_color())
            axis.annotate(
                row["method"],
                (row["avg_visual_tokens"], row["prefill_ms"]),
                fontsize=8,
                xytext=(4, -12 if row["method"] == "fastv" else 4),
                textcoords="offset points",
            )
    axis.set_xlabel("average visual tokens per layer")
    axis.set_ylabel("prefill latency (ms)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    axis.set_title(
        f"{shape.num_layers} layers, d={shape.hidden_size}, {shape.visual_tokens} visual + "
        f"{shape.text_tokens} text tokens ({rows[0]['device']})",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
