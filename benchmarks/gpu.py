"""One prepared GPU run: the paper-scale numbers of `pdrop bench` and the correctness checks, in one command.

    PYTHONPATH=src python benchmarks/gpu.py --out OUT          # a CUDA machine: about 3 min, at most 7.5
    python benchmarks/gpu.py --smoke --out OUT                 # CPU, tiny shapes, the same code (tests)

It needs only what a GPU machine's Python has (torch, transformers, Pillow; torchvision for the video
section) and this checkout; nothing is downloaded. Sections, in order (docs/benchmarks.md says what each
measures):

- `build_model`: one random-weight LLaVA language model of the 7B shape (32 layers, hidden 4096, MLP 11008,
  bf16, sdpa). LLaVA-1.5-7B and LLaVA-NeXT-7B share it (Vicuna-7B); they differ in visual tokens (576 and
  2880, the NeXT maximum of 5 crops x 576). `--layers` builds fewer layers if memory is short; every layer has
  the same shape, so FLOPs and time scale by full depth / layers and the speed-ups stay those of full depth.
- `prefill_<shape>_b<batch>`: no drop, PyramidDrop (lambda = 0.5, 4 stages) and FastV at PyramidDrop's
  average budget, interleaved; prefill (time to first token of the language model), ranking time per drop,
  measured against FLOPs-predicted speed-up, decode per token, KV-cache bytes, peak memory (`bench.py`).
- `train_llava-next-7b_b1`: one forward + backward with gradient checkpointing, the same three settings.
- `correctness`: padded batch = samples alone, cached decoding = full recompute; `video`: `pdrop show --video`
  with real processors (`gpu_checks.py`).

Every section runs under its own time cap and the run under a total budget: a section that fails or runs
out of time is recorded as such and the next one runs; `results.json` and `results.md` are rewritten after
every section, so a run killed from outside still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]  # this checkout's package, installed or not
sys.path.append(str(ROOT / "tests" / "support"))  # tiny_models, for the correctness checks
sys.path.append(str(ROOT / "benchmarks"))

import torch  # noqa: E402
from gpu_runner import Interrupted, Runner, _raise_interrupted  # noqa: E402

from pyramiddrop.api import get_drop_record  # noqa: E402
from pyramiddrop.flops import prefill_flops  # noqa: E402
from pyramiddrop.tools import bench, bench_measure  # noqa: E402

FULL_DEPTH = 32  # LLaVA-1.5-7B and LLaVA-NeXT-7B (Vicuna-7B)
GPU_SHAPES = {"llava-1.5-7b": bench.PRESETS["llava-1.5-7b"], "llava-next-7b": bench.PRESETS["llava-next-7b"]}
# The same ratio of visual tokens (576 : 2880 = 64 : 320) on a 4-layer toy. 32 text tokens, so that a
# training step's answer (the last 8) follows question tokens: the query of its ranking is text, as at 7B.
SMOKE_SHAPES = {
    "llava-1.5-7b": replace(bench.PRESETS["tiny"], text_tokens=32),
    "llava-next-7b": replace(bench.PRESETS["tiny"], visual_tokens=320, text_tokens=32),
}
TRAIN_SHAPE = "llava-next-7b"


@dataclass
class Plan:
    """What one run measures and how long each section may take (seconds)."""

    device: str
    shapes: dict[str, bench.Shape]
    layers: int
    full_depth: int
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    dtype: str = "bfloat16"
    attn: str = "sdpa"
    warmup: int = 3
    repeats: int = 10
    decode_steps: int = 16
    budget_s: float = 450.0
    caps: dict[str, float] = field(default_factory=dict)


def gpu_plan(layers: int, repeats: int, warmup: int, budget_s: float) -> Plan:
    caps = {"build_model": 120, "correctness": 60, "video": 60, "train_llava-next-7b_b1": 75}
    caps |= {"prefill_llava-1.5-7b_b1": 45, "prefill_llava-next-7b_b1": 50}
    caps |= {"prefill_llava-1.5-7b_b8": 50, "prefill_llava-next-7b_b8": 90}
    shapes = {name: replace(shape, num_layers=layers) for name, shape in GPU_SHAPES.items()}
    return Plan("cuda", shapes, layers, FULL_DEPTH, repeats=repeats, warmup=warmup, budget_s=budget_s, caps=caps)


def memory_needed_gb(shape: bench.Shape, batch_size: int, train: bool) -> float:
    """A generous bf16 estimate of a section's peak: weights (and their gradients), the KV cache (or the
    checkpointed layer inputs), one layer's activations and the logits, plus 25 %."""
    d, m, vocab, layers = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_layers
    kv = shape.num_kv_heads * d // shape.num_heads
    tokens = batch_size * (shape.visual_tokens + shape.text_tokens)
    weights = 2 * (2 * vocab * d + layers * (2 * d * d + 2 * d * kv + 3 * d * m))
    if train:
        activations = 2 * tokens * (layers * d + 12 * d + 6 * m) + 12 * tokens * vocab
        return 1.25 * (2 * weights + activations) / 2**30
    return 1.25 * (weights + 2 * 2 * layers * tokens * kv + 2 * tokens * (6 * d + 3 * m)) / 2**30


def fit_depth(plan: Plan, memory_gb: float) -> int:
    """The deepest multiple of 4 (at most `plan.layers`) whose largest section fits in 90 % of the device."""
    layers = plan.layers
    while layers > 4:
        needs = [
            memory_needed_gb(replace(s, num_layers=layers), max(plan.batch_sizes), False) for s in plan.shapes.values()
        ]
        needs.append(memory_needed_gb(replace(plan.shapes[TRAIN_SHAPE], num_layers=layers), 1, True))
        if max(needs) <= 0.9 * memory_gb:
            break
        layers -= 4
    return layers


def smoke_plan(budget_s: float) -> Plan:
    return Plan("cpu", dict(SMOKE_SHAPES), 4, 4, warmup=1, repeats=2, decode_steps=3, budget_s=budget_s)


def section_names(plan: Plan) -> list[str]:
    """The headline numbers first: a later section that breaks the CUDA context cannot cost them."""
    names = ["build_model"]
    names += [f"prefill_{shape}_b{batch}" for batch in plan.batch_sizes for shape in plan.shapes]
    return names + [f"train_{TRAIN_SHAPE}_b1", "correctness", "video"]


class Suite:
    """The measuring sections; the 7B-shaped model is built once and shared."""

    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan, self.out, self.model = plan, out, None

    def build_model(self, deadline: float) -> dict:
        plan = self.plan
        shape = plan.shapes["llava-1.5-7b"]
        started = time.monotonic()
        self.model = bench.build_model(shape, getattr(torch, plan.dtype), plan.device)
        self.model.set_attn_implementation(plan.attn)
        bench_measure.sync(plan.device)
        parameters = sum(p.numel() for p in self.model.model.language_model.parameters())
        return {
            "num_layers": plan.layers,
            "full_depth": plan.full_depth,
            "language_model_parameters": parameters,
            "build_s": round(time.monotonic() - started, 2),
            "resident_mb": _memory_allocated_mb(plan.device),
        }

    def prefill(self, shape_name: str, batch_size: int, deadline: float) -> dict:
        return self._measure(shape_name, batch_size, deadline, train=False)

    def train(self, shape_name: str, batch_size: int, deadline: float) -> dict:
        bench_measure.prepare_training(self.model, gradient_checkpointing=True)
        try:
            return self._measure(shape_name, batch_size, deadline, train=True)
        finally:
            self.model.gradient_checkpointing_disable()
            self.model.eval()

    def _measure(self, shape_name: str, batch_size: int, deadline: float, train: bool) -> dict:
        plan, model = self.plan, self.model
        shape = plan.shapes[shape_name]
        settings = bench.settings_for(shape)
        configs = [config.to_dict() if config else None for _, config in settings]
        inputs = bench.prompt_inputs(shape, batch_size, plan.device, train)
        latency_deadline = time.monotonic() + 0.6 * (deadline - time.monotonic())  # the rest for memory, decode
        latencies = bench_measure.time_settings(
            model, inputs, configs, plan.device, plan.warmup, plan.repeats, train, latency_deadline
        )
        memories, kept = [], []
        for config in configs:
            memories.append(
                bench_measure.measure_setting_memory(model, inputs, config, plan.device, plan.decode_steps, train)
            )
            record = get_drop_record(model) if config else None
            kept.append([len(k) for k in record.kept_visual_indices[0]] if record else [shape.visual_tokens])
        run = {"dtype": plan.dtype, "device": plan.device, "attn": plan.attn, "batch_size": batch_size}
        if train:
            run["gradient_checkpointing"] = True
        rows = bench.setting_rows(shape, settings, latencies, memories, train, **run)
        full_shape = replace(shape, num_layers=plan.full_depth)
        full_settings = bench.settings_for(full_shape)
        full_flops = [
            prefill_flops(bench.build_text_config(full_shape), shape.text_tokens, shape.visual_tokens, config)
            for _, config in full_settings
        ]
        for row, kept_per_stage, flops in zip(rows, kept, full_flops):
            row["kept_visual_tokens_per_stage"] = kept_per_stage
            row["time_change"] = 1 / row["speedup"] - 1  # -0.45 is "45 % less time to first token"
            row["num_layers"], row["full_depth"] = plan.layers, plan.full_depth
            row["predicted_speedup_full_depth"] = full_flops[0] / flops
        return {"shape": asdict(shape), "rows": rows}

    def correctness(self, deadline: float) -> dict:
        from gpu_checks import correctness_checks

        checks = correctness_checks(self.plan.device)
        return {"checks": checks, "all_passed": all(check["passed"] for check in checks)}

    def video(self, deadline: float) -> dict:
        from gpu_checks import video_checks

        self.out.mkdir(parents=True, exist_ok=True)
        checks = video_checks(self.out)
        return {"checks": checks, "all_passed": all(check["passed"] for check in checks)}


def run_suite(plan: Plan, out: Path, only: set[str] | None = None) -> dict:
    header = {"suite": "benchmarks/gpu.py", "environment": environment(plan)}
    runner, suite = Runner(out, plan.budget_s, plan.caps, header), Suite(plan, out)
    runner.results["plan"] = {**asdict(plan), "shapes": {k: asdict(v) for k, v in plan.shapes.items()}}
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted)  # a kill from outside: save, then stop
    try:
        for name in section_names(plan):
            if only is not None and name not in only and name != "build_model":
                continue
            kind, *rest = name.split("_")
            if name == "build_model":
                if only is not None and not any(n.startswith(("prefill", "train")) for n in only):
                    continue
                runner.run(name, suite.build_model)
            elif kind in ("prefill", "train"):
                shape_name, batch = "_".join(rest[:-1]), int(rest[-1][1:])
                measure = suite.prefill if kind == "prefill" else suite.train
                runner.run(name, lambda deadline, m=measure, s=shape_name, b=batch: m(s, b, deadline), "build_model")
            elif name == "video" and importlib.util.find_spec("torchvision") is None:
                runner.skip(name, "torchvision is not installed: transformers' video processors need it")
            else:
                runner.run(name, getattr(suite, name))
            if plan.device.startswith("cuda"):
                torch.cuda.empty_cache()
    except Interrupted:
        print("[gpu.py] interrupted; results so far are saved", file=sys.stderr, flush=True)
    else:
        runner.save(finished=True)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    return runner.results


def environment(plan: Plan) -> dict:
    versions = {}
    for package in ("torch", "transformers", "accelerate", "torchvision", "tokenizers", "pillow", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "git_commit": _command(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "device": plan.device,
        "device_name": platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    if plan.device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(0)
        info |= {
            "device_name": properties.name,
            "device_memory_gb": round(properties.total_memory / 2**30, 1),
            "compute_capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "driver": _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or _driver_file(),
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def _command(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _driver_file() -> str | None:
    """The kernel module's version line, where nvidia-smi is missing."""
    path = Path("/proc/driver/nvidia/version")
    return path.read_text().splitlines()[0].strip() if path.exists() else None


def _memory_allocated_mb(device: str) -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds: the same code paths")
    parser.add_argument("--layers", type=int, default=FULL_DEPTH, help="decoder layers of the 7B shapes (4..32)")
    parser.add_argument("--repeats", type=int, default=20, help="measured rounds per section (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, help="total seconds (default 450 on a GPU, 300 with --smoke)")
    parser.add_argument("--sections", help="comma-separated section names, to rerun a few (build_model is implied)")
    args = parser.parse_args(argv)
    if not 4 <= args.layers <= FULL_DEPTH or args.layers % 4:
        parser.error(f"--layers must be a multiple of 4 in [4, {FULL_DEPTH}] (4 equal stages), got {args.layers}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be at least 1 and --warmup at least 0, got {args.repeats} and {args.warmup}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; run on a GPU machine, or add --smoke for the CPU check")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        plan = smoke_plan(args.budget_s or 300.0)
    else:
        plan = gpu_plan(args.layers, args.repeats, args.warmup, args.budget_s or 450.0)
        fitted = fit_depth(plan, torch.cuda.get_device_properties(0).total_memory / 2**30)
        if fitted != args.layers:
            print(f"[gpu.py] {args.layers} layers do not fit this device; building {fitted}", file=sys.stderr)
            plan = gpu_plan(fitted, args.repeats, args.warmup, plan.budget_s)
    only = None
    if args.sections:
        only = set(args.sections.split(","))
        unknown = only - set(section_names(plan))
        if unknown:
            raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {section_names(plan)}")
    results = run_suite(plan, Path(args.out), only)
    statuses = {name: section["status"] for name, section in results["sections"].items()}
    print(json.dumps(statuses, indent=1))
    return results


if __name__ == "__main__":
    main()
