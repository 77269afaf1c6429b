"""`pdrop bench`: prefill latency, decode latency, KV cache and peak memory against the FLOPs prediction.

The language model of a LLaVA-shaped model with random weights is measured (the vision encoder costs the
same with or without dropping). Every setting runs in a fresh process, so peak memory is its own.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop
from pyramiddrop.budget import average_visual_fraction, fastv_schedule
from pyramiddrop.flops import prefill_flops
from pyramiddrop.scoring import SCORERS

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


def _inputs(shape: Shape, batch_size: int, device: str, train: bool = False) -> dict:
    half = shape.text_tokens // 2
    row = [1] + [10] * (half - 1) + [IMAGE_TOKEN_ID] * shape.visual_tokens + [11] * (shape.text_tokens - half)
    input_ids = torch.tensor([row] * batch_size, device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if train:
        labels = torch.full_like(input_ids, -100)
        labels[:, -ANSWER_TOKENS:] = input_ids[:, -ANSWER_TOKENS:]
        inputs["labels"] = labels
    return inputs


def _step(model, inputs: dict, train: bool) -> None:
    """One prefill (inference) or one forward + backward pass (training; optimizer cost is the same for all)."""
    if train:
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> float:
    """Start a fresh peak-memory window; returns the current resident memory in MB."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    return _proc_status_mb("VmRSS")


def _peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status_mb("VmHWM")


def _proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _load(job: dict):
    shape, device = Shape(**job["shape"]), job["device"]
    dtype = getattr(torch, job["dtype"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job.get("weights"):
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(job["weights"], dtype=dtype).to(device).eval()
    else:
        model = build_model(shape, dtype, device)
    model.set_attn_implementation(job["attn"])
    if job.get("train"):
        prepare_training(model, job.get("gradient_checkpointing", False))
    return model, _inputs(shape, job["batch_size"], device, job.get("train", False))


def prepare_training(model, gradient_checkpointing: bool) -> None:
    """Training mode, with gradient checkpointing (non-reentrant) when asked."""
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _configure(model, config_dict: dict | None) -> PyramidDropConfig | None:
    from pyramiddrop import is_pyramid_drop_applied, remove_pyramid_drop

    if is_pyramid_drop_applied(model):
        remove_pyramid_drop(model)
    config = PyramidDropConfig.from_dict(config_dict) if config_dict else None
    if config is not None:
        apply_pyramid_drop(model, config)
    return config


class _Span:
    """A timed span: CUDA events on a GPU (no synchronisation inside it; read after it ends), the wall clock on
    CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> _Span:
        if self.cuda:
            self._end.record()
        else:
            self._end = time.perf_counter()
        return self

    def ms(self) -> float:
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        return (self._end - self._start) * 1e3


class _RankTimer:
    """Wraps the scorers to time every ranking call (a `_Span` each, so a GPU forward is not synchronised by it);
    the scorers are restored on exit."""

    def __init__(self, device: str) -> None:
        self.device, self._spans, self._originals = device, [], {}

    def __enter__(self) -> _RankTimer:
        self._originals = dict(SCORERS)
        for name, scorer in self._originals.items():
            SCORERS[name] = self._timed(scorer)
        return self

    def __exit__(self, *exc) -> None:
        SCORERS.update(self._originals)

    def _timed(self, scorer):
        def timed(rank_inputs):
            span = _Span(self.device)
            scores = scorer(rank_inputs)
            self._spans.append(span.stop())
            return scores

        return timed

    def take_ms(self) -> list[float]:
        """Milliseconds of each ranking call since the last take."""
        spans, self._spans = self._spans, []
        return [span.ms() for span in spans]


def time_settings(
    model,
    inputs: dict,
    configs: list[dict | None],
    device: str,
    warmup: int,
    repeats: int,
    train: bool = False,
    deadline: float | None = None,
) -> list[dict]:
    """Prefill (or training step) latency of every setting on one loaded model, interleaved round by round so
    drift hits all alike; medians over the measured rounds. Rounds stop early once `time.monotonic()` passes
    `deadline` (after at least one measured round); `repeats` says how many were measured."""
    times = [[] for _ in configs]
    shares = [[] for _ in configs]
    calls = [[] for _ in configs]
    with _RankTimer(device) as timer:
        for round_index in range(warmup + repeats):
            if deadline is not None and round_index > warmup and time.monotonic() > deadline:
                break
            for index, config_dict in enumerate(configs):
                _configure(model, config_dict)
                timer.take_ms()
                _sync(device)
                span = _Span(device)
                _step(model, inputs, train)
                elapsed, ranking = span.stop().ms(), timer.take_ms()
                if round_index >= warmup:
                    times[index].append(elapsed / 1e3)
                    shares[index].append(sum(ranking) / elapsed)
                    calls[index].append(ranking)
    return [
        {
            "prefill_ms": statistics.median(t) * 1e3,
            "rank_share": statistics.median(r),
            "rank_ms": statistics.median(r) * statistics.median(t) * 1e3,
            "rank_ms_per_drop": statistics.median([ms for row in c for ms in row]) if c[0] else 0.0,
            "drops_ranked": len(c[0]),
            "repeats": len(t),
        }
        for t, r, c in zip(times, shares, calls)
    ]


def measure_latency(job: dict) -> list[dict]:
    """`time_settings` on the job's model (worker entry point)."""
    model, inputs = _load(job)
    return time_settings(model, inputs, job["configs"], job["device"], job["warmup"], job["repeats"], job.get("train"))


def measure_setting_memory(
    model, inputs: dict, config_dict: dict | None, device: str, decode_steps: int, train: bool = False
) -> dict:
    """Peak memory of one prefill (or training step) above what was resident before it; for a prefill also the
    KV-cache bytes and the median decode latency per token (greedy, continuing the prefill's cache)."""
    _configure(model, config_dict)
    if train:
        _step(model, inputs, True)  # allocator warm-up, then the measured step
        resident = _reset_peak(device)
        _step(model, inputs, True)
        _sync(device)
        peak = _peak(device)
        return {"peak_mem_mb": peak, "peak_over_resident_mb": peak - resident}
    with torch.no_grad():
        resident = _reset_peak(device)
        out = model(**inputs, logits_to_keep=1)
        _sync(device)
        peak = _peak(device)
        cache = out.past_key_values
        kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        step_times, mask = [], inputs["attention_mask"]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            _sync(device)
            span = _Span(device)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
            step_times.append(span.stop().ms())
            token = out.logits[:, -1:].argmax(-1)
    return {
        "decode_ms_per_token": statistics.median(step_times[1:] or step_times),
        "kv_cache_bytes": kv_bytes,
        "peak_mem_mb": peak,
        "peak_over_resident_mb": peak - resident,
    }


def measure_memory(job: dict) -> dict:
    """`measure_setting_memory` in a fresh process (worker entry point), so the peak is this setting's own."""
    model, inputs = _load(job)
    return measure_setting_memory(
        model, inputs, job["config"], job["device"], job["decode_steps"], job.get("train", False)
    )


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
            "settings": _settings_dict(config),
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


def _settings_dict(config: PyramidDropConfig | None) -> dict:
    if config is None:
        return {}
    return {
        "layer_list": config.layer_list,
        "image_token_ratio_list": config.image_token_ratio_list,
        "position_mode": config.position_mode,
    }


def _run_worker(kind: str, job: dict):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    completed = subprocess.run(
        [sys.executable, "-m", "pyramiddrop.bench", kind, json.dumps(job)], capture_output=True, text=True, env=env
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


if __name__ == "__main__":  # worker entry point: one JSON job in, one JSON result line out
    worker = {"latency": measure_latency, "memory": measure_memory}[sys.argv[1]]
    print(json.dumps(worker(json.loads(sys.argv[2]))))
