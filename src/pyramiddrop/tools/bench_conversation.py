"""`pdrop bench --conversation T`: what a follow-up turn costs under `conversation="keep"` / `"rerank"`.

Against the alternative a user has for re-ranking, a fresh PyramidDrop prefill of the whole conversation.
The language model's time on each follow-up turn's first forward is measured (the answer's decoding is the
same for all three); the modes are interleaved in one process, so drift hits them alike. Also reported: the
KV cache and the hidden states `"rerank"` stores (batch x length x width), after the last turn.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop
from pyramiddrop.api import _ENGINE_ATTRIBUTE


class _FirstCallTimer:
    """Seconds of the language model's first forward in every generate() call (set `armed` before each)."""

    def __init__(self, language_model) -> None:
        self.armed, self.seconds, self._start = False, 0.0, 0.0
        self.handles = [
            language_model.register_forward_pre_hook(self._pre),
            language_model.register_forward_hook(self._post),
        ]

    def _pre(self, *args) -> None:
        if self.armed:
            self._start = time.perf_counter()

    def _post(self, *args) -> None:
        if self.armed:
            self.seconds, self.armed = time.perf_counter() - self._start, False


def _conversation(model, config, prompt: dict, questions: list[torch.Tensor], answer_tokens: int, timer, fresh: bool):
    """Turn prefill seconds of every follow-up turn, continuing a cache (or a fresh prefill when `fresh`)."""
    apply_pyramid_drop(model, config)
    options = dict(max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, do_sample=False)
    with torch.no_grad():
        out = model.generate(**prompt, **options, return_dict_in_generate=True)
        seconds = []
        for question in questions:
            ids = torch.cat([out.sequences, question], 1)
            mask = torch.ones_like(ids)
            cache = {} if fresh else {"cache": out.cache}
            timer.armed = True
            out = model.generate(input_ids=ids, attention_mask=mask, **cache, **options, return_dict_in_generate=True)
            seconds.append(timer.seconds)
    boundary = getattr(model, _ENGINE_ATTRIBUTE).prefill.boundary
    cache = out.cache
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    stored = boundary.nbytes() if boundary is not None and not fresh else 0
    return seconds, kv_bytes, stored, out.sequences.shape[1]


def measure_conversation(
    model,
    prompt: dict,
    config: PyramidDropConfig,
    turns: int,
    question_tokens: int = 16,
    answer_tokens: int = 8,
    repeats: int = 3,
) -> dict:
    """Median follow-up turn prefill (ms) per mode, for a conversation of `turns` questions on one image."""
    generator = torch.Generator().manual_seed(0)
    batch = prompt["input_ids"].shape[0]
    questions = [torch.randint(10, 20, (batch, question_tokens), generator=generator) for _ in range(turns - 1)]
    timer = _FirstCallTimer(model.model.language_model)
    modes = {
        "keep": (replace(config, conversation="keep"), False),
        "rerank": (replace(config, conversation="rerank"), False),
        "fresh_prefill": (replace(config, conversation="keep"), True),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    memory: dict[str, tuple[int, int]] = {}
    for _ in range(repeats):
        for name, (mode_config, fresh) in modes.items():
            seconds, kv_bytes, stored, length = _conversation(
                model, mode_config, prompt, questions, answer_tokens, timer, fresh
            )
            times[name].append(sum(seconds) / len(seconds))
            memory[name] = (kv_bytes, stored)
    for handle in timer.handles:
        handle.remove()
    result = {"turns": turns, "question_tokens": question_tokens, "answer_tokens": answer_tokens}
    result["conversation_tokens"] = length  # the whole conversation after the last answer
    for name in modes:
        result[f"{name}_turn_ms"] = statistics.median(times[name]) * 1e3
        result[f"{name}_kv_cache_bytes"], result[f"{name}_stored_bytes"] = memory[name]
    result["fresh_over_rerank"] = result["fresh_prefill_turn_ms"] / result["rerank_turn_ms"]
    return result


def format_conversation(rows: list[dict]) -> str:
    lines = [
        "follow-up turn prefill, median over turns and repeats (language model only):",
        "turns   keep ms   rerank ms   fresh prefill ms   fresh/rerank   rerank stored MB   KV cache MB",
    ]
    for row in rows:
        lines.append(
            f"{row['turns']:>5}   {row['keep_turn_ms']:>7.1f}   {row['rerank_turn_ms']:>9.1f}   "
            f"{row['fresh_prefill_turn_ms']:>16.1f}   {row['fresh_over_rerank']:>12.2f}   "
            f"{row['rerank_stored_bytes'] / 2**20:>16.2f}   {row['rerank_kv_cache_bytes'] / 2**20:>11.2f}"
        )
    return "\n".join(lines)
