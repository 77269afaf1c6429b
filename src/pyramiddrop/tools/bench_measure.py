"""`pdrop bench`'s measurements, run in a worker process per setting: prefill (or training step) latency of every
setting interleaved on one loaded model, the share of it spent ranking, and peak memory, KV cache and decode
latency of one setting.

`python -m pyramiddrop.tools.bench_measure latency|memory JOB` is the worker: one JSON job in, one JSON line out.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.scoring import SCORERS
from pyramiddrop.tools.bench import Shape, build_model, prompt_inputs
from pyramiddrop.tools.inputs import use_drop


def _step(model, inputs: dict, train: bool) -> None:
    """One prefill (inference) or one forward + backward pass (training; optimizer cost is the same for all)."""
    if train:
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)


def sync(device: str) -> None:
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
    return model, prompt_inputs(shape, job["batch_size"], device, job.get("train", False))


def prepare_training(model, gradient_checkpointing: bool) -> None:
    """Training mode, with gradient checkpointing (non-reentrant) when asked."""
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _configure(model, config_dict: dict | None) -> None:
    use_drop(model, PyramidDropConfig.from_dict(config_dict) if config_dict else None)


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
                sync(device)
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
        sync(device)
        peak = _peak(device)
        return {"peak_mem_mb": peak, "peak_over_resident_mb": peak - resident}
    with torch.no_grad():
        resident = _reset_peak(device)
        out = model(**inputs, logits_to_keep=1)
        sync(device)
        peak = _peak(device)
        cache = out.cache
        kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        step_times, mask = [], inputs["attention_mask"]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            sync(device)
            span = _Span(device)
            out = model(input_ids=token, attention_mask=mask, cache=cache, logits_to_keep=1)
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


if __name__ == "__main__":  # worker entry point: one JSON job in, one JSON result line out
    worker = {"latency": measure_latency, "memory": measure_memory}[sys.argv[1]]
    print(json.dumps(worker(json.loads(sys.argv[2]))))
