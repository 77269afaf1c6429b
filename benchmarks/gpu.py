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
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]  # this checkout's package, installed or not
sys.path.append(str(ROOT / "tests"))  # tiny_models, for the correctness checks
sys.path.append(str(ROOT / "benchmarks"))

import torch  # noqa: E402

from pyramiddrop import bench  # noqa: E402
from pyramiddrop.api import get_drop_record  # noqa: E402
from pyramiddrop.flops import prefill_flops  # noqa: E402

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


class SectionTimeout(Exception):
    """A section ran past its cap (raised by the alarm signal)."""


class Interrupted(BaseException):
    """SIGTERM from outside (a timeout around the whole run): record, save, stop."""


class Runner:
    """Runs sections in order under caps and a total budget; writes the results after every section."""

    def __init__(self, out: Path, plan: Plan, header: dict, write: bool = True) -> None:
        self.out, self.plan, self.write = out, plan, write
        self.start = time.monotonic()
        self.results = {**header, "budget_s": plan.budget_s, "finished": False, "sections": {}}

    def remaining(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.start)

    def run(self, name: str, function: Callable[[float], dict], needs: str | None = None, min_s: float = 5.0):
        """`function(deadline)` returns the section's results; `needs` names a section that must have passed."""
        cap = min(self.plan.caps.get(name, self.plan.budget_s), self.remaining())
        record: dict = {"status": "skipped", "cap_s": round(cap, 1)}
        if needs is not None and self.results["sections"].get(needs, {}).get("status") != "ok":
            record["reason"] = f"section {needs} did not succeed"
        elif self.remaining() < min_s:
            left = max(self.remaining(), 0.0)
            record["reason"] = f"the total budget ({self.plan.budget_s:g} s) leaves {left:.1f} s, under {min_s:g} s"
        else:
            print(f"[gpu.py] {name} (cap {cap:.0f} s) ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, cap)
            try:
                record = {"status": "ok", **function(started + cap), "cap_s": round(cap, 1)}
            except SectionTimeout:
                record = {
                    "status": "timeout",
                    "reason": f"ran past its cap of {round(cap, 1):g} s",
                    "cap_s": round(cap, 1),
                }
            except Interrupted:
                record = {"status": "interrupted", "reason": "SIGTERM", "seconds": time.monotonic() - started}
                self.results["sections"][name] = record
                self.save()
                raise
            except Exception as error:  # recorded; the next section runs
                record = {"status": "error", "reason": f"{type(error).__name__}: {error}"[:2000]}
                record["traceback"] = traceback.format_exc()[-4000:]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            record["seconds"] = round(time.monotonic() - started, 2)
        print(f"[gpu.py] {name}: {record['status']} {record.get('reason', '')}", file=sys.stderr, flush=True)
        self.results["sections"][name] = record
        self.save()
        return record

    def skip(self, name: str, reason: str) -> None:
        print(f"[gpu.py] {name}: skipped {reason}", file=sys.stderr, flush=True)
        self.results["sections"][name] = {"status": "skipped", "reason": reason}
        self.save()

    def save(self, finished: bool = False) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.results["finished"] = finished
        if not self.write:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        partial = self.out / "results.json.partial"
        partial.write_text(json.dumps(self.results, indent=1, default=str))
        partial.replace(self.out / "results.json")
        (self.out / "results.md").write_text(format_markdown(self.results))


def _raise_timeout(signum, frame) -> None:
    raise SectionTimeout()


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted()


class Suite:
    """The measuring sections; the 7B-shaped model is built once and shared."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.model = plan, None

    def build_model(self, deadline: float) -> dict:
        plan = self.plan
        shape = plan.shapes["llava-1.5-7b"]
        started = time.monotonic()
        self.model = bench.build_model(shape, getattr(torch, plan.dtype), plan.device)
        self.model.set_attn_implementation(plan.attn)
        bench._sync(plan.device)
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
        bench.prepare_training(self.model, gradient_checkpointing=True)
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
        inputs = bench._inputs(shape, batch_size, plan.device, train)
        latency_deadline = time.monotonic() + 0.6 * (deadline - time.monotonic())  # the rest for memory, decode
        latencies = bench.time_settings(
            model, inputs, configs, plan.device, plan.warmup, plan.repeats, train, latency_deadline
        )
        memories, kept = [], []
        for config in configs:
            memories.append(bench.measure_setting_memory(model, inputs, config, plan.device, plan.decode_steps, train))
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

        checks = video_checks()
        return {"checks": checks, "all_passed": all(check["passed"] for check in checks)}


def run_suite(plan: Plan, out: Path, only: set[str] | None = None) -> dict:
    runner, suite = Runner(out, plan, {"suite": "benchmarks/gpu.py", "environment": environment(plan)}), Suite(plan)
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


# -- the Markdown report ---------------------------------------------------------------------------------
PREFILL_COLUMNS = [
    ("shape", lambda r, s: s),
    ("batch", lambda r, s: r["batch_size"]),
    ("method", lambda r, s: r["method"]),
    ("kept per stage", lambda r, s: " / ".join(map(str, r["kept_visual_tokens_per_stage"]))),
    ("avg visual", lambda r, s: f"{r['avg_visual_tokens']:.0f}"),
    ("prefill ms", lambda r, s: f"{r['prefill_ms']:.2f}"),
    ("TTFT change", lambda r, s: f"{100 * r['time_change']:+.1f} %"),
    ("speed-up", lambda r, s: f"{r['speedup']:.2f}"),
    ("FLOPs-predicted", lambda r, s: f"{r['predicted_speedup']:.2f}"),
    ("measured / predicted", lambda r, s: f"{r['measured_over_predicted']:.2f}"),
    ("rank ms per drop", lambda r, s: f"{r['rank_ms_per_drop']:.3f}" if r["drops_ranked"] else "-"),
    ("rank share", lambda r, s: f"{100 * r['rank_share']:.2f} %"),
    ("decode ms/token", lambda r, s: f"{r['decode_ms_per_token']:.2f}"),
    ("KV cache MB", lambda r, s: f"{r['kv_cache_bytes'] / 2**20:.1f}"),
    ("peak MB", lambda r, s: f"{r['peak_mem_mb']:.0f}"),
    ("peak above resident MB", lambda r, s: f"{r['peak_over_resident_mb']:.0f}"),
]
TRAIN_COLUMNS = [
    ("shape", lambda r, s: s),
    ("batch", lambda r, s: r["batch_size"]),
    ("method", lambda r, s: r["method"]),
    ("step ms", lambda r, s: f"{r['train_step_ms']:.1f}"),
    ("time ratio", lambda r, s: f"{1 / r['speedup']:.3f}"),
    ("FLOPs-predicted ratio", lambda r, s: f"{1 / r['predicted_speedup']:.3f}"),
    ("rank ms per drop", lambda r, s: f"{r['rank_ms_per_drop']:.3f}" if r["drops_ranked"] else "-"),
    ("peak MB", lambda r, s: f"{r['peak_mem_mb']:.0f}"),
    ("peak above resident MB", lambda r, s: f"{r['peak_over_resident_mb']:.0f}"),
]


def _table(columns, rows: list[tuple[dict, str]]) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell(row, shape)) for _, cell in columns) + " |" for row, shape in rows]


def format_markdown(results: dict) -> str:
    env, sections = results["environment"], results["sections"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    device = env["device_name"]
    if "driver" in env:
        device += f" ({env.get('device_memory_gb')} GB), driver {env['driver']}, CUDA {env['torch_cuda']}"
    lines = [
        f"# benchmarks/gpu.py results ({'finished' if results['finished'] else 'partial'}, "
        f"{results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget)",
        "",
        f"{device}; {versions}; Python {env['python']}; commit {env['git_commit'] or 'unknown'}; {env['date']}.",
    ]
    model = sections.get("build_model", {})
    if model.get("status") == "ok":
        lines.append(
            f"Language model: {model['num_layers']} of {model['full_depth']} layers built "
            f"({model['language_model_parameters'] / 1e6:,.0f} M parameters, built in {model['build_s']:.0f} s); "
            "speed-ups are depth-independent, times scale by full depth / layers."
        )
    prefill = [
        (row, name.split("_")[1])
        for name, s in sections.items()
        if name.startswith("prefill")
        for row in s.get("rows", [])
    ]
    train = [
        (row, name.split("_")[1])
        for name, s in sections.items()
        if name.startswith("train")
        for row in s.get("rows", [])
    ]
    if prefill:
        lines += ["", "## Prefill (time to first token of the language model), decode, memory", ""]
        lines += _table(PREFILL_COLUMNS, prefill)
    if train:
        lines += ["", "## Training step (forward + backward, gradient checkpointing)", ""]
        lines += _table(TRAIN_COLUMNS, train)
    checks = [check for name in ("correctness", "video") for check in sections.get(name, {}).get("checks", [])]
    if checks:
        lines += ["", "## Correctness", "", "| check | attn | position mode | passed | max abs logit diff / kept |"]
        lines.append("|---|---|---|---|---|")
        for check in checks:
            detail = check.get("max_abs_logit_diff")
            detail = f"{detail:.2e}" if detail is not None else str(check.get("kept_per_stage_and_frame"))
            lines.append(
                f"| {check['check']} | {check.get('attn', '-')} | {check.get('position_mode', '-')} | "
                f"{check['passed']} | {detail} |"
            )
    lines += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, section in sections.items():
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', '-')} | {section.get('reason', '')} |")
    return "\n".join(lines) + "\n"


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
