"""`pdrop_hf`: any model PyramidDrop supports, with or without dropping, as an lmms-eval model.

    lmms-eval --model pdrop_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,layer_list=8-16-24,ratios=0.5-0.25-0.125 \\
        --tasks gqa,mme,pope,textvqa_val --batch_size 8 --output_path logs/

The model is registered through lmms-eval's `lmms_eval.models` entry point (see `lmms_eval_manifest` in
`pyramiddrop.integrations`), so installing `pyramiddrop[lmms]` is all it takes. What the run dropped is recorded
next to the scores: `results.json` gets the model_args (as lmms-eval writes them) and, under `throughput`, the
per-request averages `avg_pdrop_visual_tokens_per_layer`, `avg_pdrop_flops_paper`, `avg_pdrop_flops_e2e`, ...;
with `record=PATH` a JSON file with the resolved schedule and the same numbers per task is written as well.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm

from pyramiddrop.integrations.common import DropRequest, PyramidDropRunner, load_image

MODEL_ARGS = (
    "pretrained, layer_list, ratios (or image_token_ratio_list), lam, stages, budget, method, position_mode, "
    "query, seed, video_pool, num_visual_tokens, device, dtype, batch_size, attn_implementation, device_map, "
    "trust_remote_code, revision, max_new_tokens, record"
)


class PyramidDropLMMs(lmms):
    """lmms-eval's "simple" model interface over `PyramidDropRunner`.

    Drop settings (`model_args`, all optional; none means the unmodified model):
    `layer_list=8-16-24,ratios=0.5-0.25-0.125` | `lam=0.5[,stages=4]` | `budget=0.33`, with
    `method=pdrop|fastv|random|uniform|dart|sparsevlm|sparsevlm-norecycle|pdrop-mean|pdrop-original` (default
    `pdrop`), and optionally
    `position_mode=compact|original`, `query=last|instruction_mean`, `seed=`, `video_pool=sample|frame`,
    `num_visual_tokens=` (N for a budget's schedule; default: the first image's token count).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        layer_list: Any = None,
        ratios: Any = None,
        image_token_ratio_list: Any = None,
        lam: Any = None,
        stages: Any = None,
        budget: Any = None,
        method: str | None = None,
        position_mode: str | None = None,
        query: str | None = None,
        seed: Any = None,
        video_pool: str | None = None,
        num_visual_tokens: Any = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: Any = 1,
        attn_implementation: str | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        max_new_tokens: int = 128,
        record: str | None = None,
        max_batch_size: Any = None,  # passed by lmms-eval; batches are `batch_size`
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"pdrop_hf: unknown model_args {', '.join(sorted(unknown))}; the valid ones are: {MODEL_ARGS}."
            )
        if pretrained is None:
            raise ValueError("pdrop_hf: add pretrained=<hub id or local directory> to --model_args.")
        if ratios is not None and image_token_ratio_list is not None:
            raise ValueError("pdrop_hf: give ratios or image_token_ratio_list (the same thing), not both.")
        request = DropRequest.from_args(
            method=method,
            layer_list=layer_list,
            ratios=ratios if ratios is not None else image_token_ratio_list,
            lam=lam,
            stages=stages,
            budget=budget,
            position_mode=position_mode,
            query=query,
            seed=seed,
            video_pool=video_pool,
            num_visual_tokens=num_visual_tokens,
        )
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"pdrop_hf: --batch_size must be an integer, got {batch_size!r}.") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"pdrop_hf: --batch_size must be at least 1, got {batch_size!r}.")
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size > 1 and not device_map:  # data parallel: one model per process, on its own GPU
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            self._rank, self._world_size = int(os.environ.get("RANK", 0)), world_size
        self.runner = PyramidDropRunner.from_pretrained(
            str(pretrained),
            request,
            device=device,
            dtype=str(dtype),
            attn_implementation=attn_implementation,
            device_map=device_map,
            trust_remote_code=bool(trust_remote_code),
            revision=revision,
        )
        self.max_new_tokens = int(max_new_tokens)
        self.record = record
        eval_logger.info(f"pdrop_hf: {pretrained} with {json.dumps(self.runner.summary()['settings'])}")

    @property
    def model(self) -> Any:
        return self.runner.model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, doc: dict) -> list:
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        if visuals is None:
            return []
        if not isinstance(visuals, list | tuple):
            visuals = [visuals]
        return [load_image(visual) for visual in visuals]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched greedy generation; requests with equal generation settings share batches, longest first."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="pdrop_hf generate")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                contexts, images, tasks = [], [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    contexts.append(context)
                    images.append(self._visuals(doc_to_visual, self._doc(task, split, doc_id)))
                    tasks.append(task)
                settings = dict(requests[chunk[0]].args[1] or {})
                until = settings.pop("until", None)
                until = [until] if isinstance(until, str) else list(until or [])
                begin = time.perf_counter()
                texts = self.runner.generate(
                    images,
                    self.runner.prompts(images, contexts),
                    until=until,
                    tasks=tasks,
                    **_generation_settings(settings, self.max_new_tokens),
                )
                _log_samples(self.runner, time.perf_counter() - begin, self.runner.last_generated_tokens)
                for i, text in zip(chunk, texts):
                    results[i] = text
                bar.update(len(chunk))
        bar.close()
        self._after_requests()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean NLL of the continuation, greedy?) per request, in order; see `PyramidDropRunner.loglikelihood`."""
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="pdrop_hf loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            contexts, continuations, images, tasks = [], [], [], []
            for request in chunk:
                context, target, doc_to_visual, doc_id, task, split = request.args
                doc = self._doc(task, split, doc_id)
                contexts.append(context)
                continuations.append(target if isinstance(target, str) else target(doc))
                images.append(self._visuals(doc_to_visual, doc))
                tasks.append(task)
            prompts = self.runner.prompts(images, contexts)
            begin = time.perf_counter()
            results += [_pair(pair) for pair in self.runner.loglikelihood(images, prompts, continuations, tasks=tasks)]
            _log_samples(self.runner, time.perf_counter() - begin)
            bar.update(len(chunk))
        bar.close()
        self._after_requests()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("pdrop_hf answers single-turn requests (generate_until, loglikelihood) only.")

    def _after_requests(self) -> None:
        """Log the drop summary and write the record file; runs after each call (one per request type)."""
        summary = self.runner.summary()
        overall = summary["overall"]
        eval_logger.info(
            f"pdrop_hf: {summary['method']} {json.dumps(summary['settings'])}: {overall['requests']} requests, "
            f"{overall['visual_tokens_per_layer']:.1f} of {overall['visual_tokens']:.1f} visual tokens per layer, "
            f"paper FLOPs {overall['flops_paper']:.3g} (no drop {overall['flops_paper_no_drop']:.3g}), "
            f"end-to-end {overall['flops_e2e']:.3g} (no drop {overall['flops_e2e_no_drop']:.3g})"
        )
        if self.record:
            path = self.record if self.world_size == 1 else f"{self.record}.rank{self.rank}"
            self.runner.write_record(path)


def _tuples_survive() -> bool:
    try:
        return unwrap_generation_output((0.5, True))[0] == (0.5, True)
    except Exception:  # pragma: no cover - a version whose helper rejects tuples outright
        return False


_TUPLES_SURVIVE = _tuples_survive()


def _pair(pair: tuple[float, bool]) -> Any:
    """lmms-eval 0.7.3's evaluator passes every model output through `unwrap_generation_output`, which turns a
    (loglikelihood, is_greedy) tuple into its string and breaks `loglikelihood` / `multiple_choice` tasks; a
    `GenerationResult` carries the pair through untouched. Checked at import, so a fixed version gets tuples."""
    return pair if _TUPLES_SURVIVE else GenerationResult(text=pair)


def _generation_settings(settings: dict, default_max_new_tokens: int) -> dict:
    """lmms-eval's generation kwargs as `generate()` takes them (temperature 0 means greedy)."""
    temperature = float(settings.get("temperature") or 0.0)
    do_sample = bool(settings.get("do_sample", False)) or temperature > 0
    out = {
        "max_new_tokens": int(settings.get("max_new_tokens") or default_max_new_tokens),
        "do_sample": do_sample,
        "num_beams": int(settings.get("num_beams") or 1),
    }
    if do_sample:
        out["temperature"] = temperature or 1.0
        if settings.get("top_p") is not None:
            out["top_p"] = float(settings["top_p"])
    return out


def _log_samples(runner: PyramidDropRunner, elapsed: float, generated: list[int] | None = None) -> None:
    """One entry per request of the last call in lmms-eval's metrics log, so that the run's `results.json` holds
    their means under `throughput` (`avg_pdrop_visual_tokens_per_layer`, `avg_pdrop_flops_paper`, ...) next to
    the scores. Entries are recorded without a log line each (a benchmark has thousands of requests)."""
    from lmms_eval.models.model_utils import gen_metrics

    record_entry = getattr(gen_metrics, "_record_metrics", None)
    samples = runner.last_samples
    for index, sample in enumerate(samples):
        extra = {f"pdrop_{key}": float(value) for key, value in sample.items()} | {"total_requests": 1}
        tokens = generated[index] if generated else 0
        entry = {"total_elapsed_time": elapsed / len(samples), "total_gen_tokens": tokens, "avg_speed": 0.0}
        if record_entry is not None:
            record_entry(additional_metrics=extra, **entry)
        else:  # pragma: no cover - other lmms-eval versions
            gen_metrics.log_metrics(additional_metrics=extra, **entry)
