"""Accuracy, FLOPs, visual tokens and prefill latency of a model under several drop settings.

`pdrop eval` is a thin wrapper; `evaluate()` is usable from Python with any supported model, processor and
list of examples (`{"image": PIL image or path, "question": str, "answer": str, "type": str}`).
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
import time
from collections.abc import Iterator

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from pyramiddrop import get_drop_record
from pyramiddrop.flops import paper_flops, prefill_flops
from pyramiddrop.settings import Setting
from pyramiddrop.tools.answers import normalize_answer  # first word, lower case, numbers as words
from pyramiddrop.tools.inputs import build_inputs, count_visual_tokens, open_image, use_drop
from pyramiddrop.tools.progress import progress_bar
from pyramiddrop.tools.stats import mcnemar_exact, paired_bootstrap_diff, wilson_interval

NOISE = "noise"  # the control row: all visual tokens, replaced by noise (what accuracy is without the image)
BOOTSTRAP_RESAMPLES = 2000  # paired bootstrap over questions, for the differences between rows
BOOTSTRAP_SEED = 0


def question_seed(example: dict) -> int:
    """A seed from a question's image (its pixels, or its path) and text alone."""
    digest = hashlib.sha256(example["question"].encode())
    image = example["image"]
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode() + image.tobytes())
    else:
        digest.update(str(image).encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


@contextlib.contextmanager
def noise_visual_tokens(model, seeds: list[int] | None = None) -> Iterator[None]:
    """Replace each image's projected visual tokens by Gaussian noise of that image's mean and std (a no-image
    control). Image `i` of a call draws from `seeds[i]` (`question_seed`: a question's noise is its own whatever the
    batch size and the order of the questions), or from `i` without seeds."""
    projector = getattr(getattr(model, "model", None), "multi_modal_projector", None)
    if projector is None:
        raise ValueError(
            f"the noise control needs a LLaVA-style multi_modal_projector; {type(model).__name__} has none"
        )

    def hook(module, args, output):
        noisy = []
        for image, features in enumerate(output):
            generator = torch.Generator().manual_seed(image if seeds is None else seeds[image])
            noise = torch.randn(features.shape, generator=generator).to(features)
            noisy.append(noise * features.std() + features.mean())
        return torch.stack(noisy)

    handle = projector.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def is_labelled(examples: list[dict]) -> bool:
    return all(example.get("answer") is not None for example in examples)


class _FirstStepClock(LogitsProcessor):
    """Notes when generate() first reaches the logits: the end of the prefill forward."""

    def __init__(self) -> None:
        self.first_call: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first_call is None:
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.first_call = time.perf_counter()
        return scores


def evaluate(
    model,
    processor,
    examples: list[dict],
    settings: list[Setting],
    batch_size: int = 8,
    max_new_tokens: int = 4,
    progress: bool = True,
    references: tuple[str, ...] = ("none",),
) -> tuple[list[dict], dict]:
    """Rows of the results table (one per setting) and per-example answers keyed by method index.

    Every row holds its per-question correctness (`correct`, 0/1 in example order), its accuracy's 95 % Wilson
    interval, and, for each method in `references` present among the settings (its first row), the paired
    difference to it (see `add_paired_differences`). With a no-drop row first, every row also gets its loyalty
    (EffiVLM-Bench): `loyalty` (share of answers identical to no drop's, with `loyalty_ci`), and from the first
    answer token's distribution `first_token_agreement` (same top-1 token) and `first_token_kl` (mean
    KL(no drop || setting), nats). No-drop's first-token log-probabilities are kept for that: questions x vocab
    floats. `kept_per_stage`: the visual tokens of each stage, per question ([] without a drop).

    Examples without answers (label-free) give rows without accuracy (`accuracy`, `correct`, ... None): loyalty
    to the no-drop row, which must come first, is then what a row says.
    """
    labelled = is_labelled(examples)
    if not labelled and (not settings or settings[0].method != "none"):
        raise ValueError("examples without answers are measured by loyalty to no drop: put Setting('none') first.")
    text_config = model.config.get_text_config()
    shape = (text_config.num_hidden_layers, text_config.hidden_size, text_config.intermediate_size)
    for setting in settings:  # every apply-time refusal before the first generation, not after an hour of them
        use_drop(model, setting.config)
    use_drop(model, None)
    rows, answers = [], {}
    reference_logprobs: torch.Tensor | None = None  # no drop's first answer token, [questions, vocab]
    bar = progress_bar(total=len(settings) * len(examples), disable=not progress, desc="pdrop eval", unit="q")
    for index, setting in enumerate(settings):
        use_drop(model, setting.config)
        correct, predictions, prefill_ms, first_logprobs, kept_per_stage = [], [], [], [], []
        flops_paper = flops_e2e = visual_per_layer = 0.0
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            images = [open_image(example["image"]) for example in batch]
            inputs = build_inputs(processor, images, [example["question"] for example in batch])
            clock = _FirstStepClock()
            noise = contextlib.nullcontext()
            if setting.method == NOISE:
                noise = noise_visual_tokens(model, [question_seed(example) for example in batch])
            with torch.no_grad(), noise:
                begin = time.perf_counter()
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([clock]),
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            prefill_ms.append((clock.first_call - begin) * 1e3)
            first_logprobs.append(torch.log_softmax(output.logits[0].float(), dim=-1).cpu())
            sequences = output.sequences
            texts = processor.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for example, text in zip(batch, texts):
                predictions.append(normalize_answer(text))
                if labelled:
                    correct.append(normalize_answer(text) == normalize_answer(example["answer"]))
            num_visual = count_visual_tokens(model, inputs["input_ids"])
            num_text = inputs["attention_mask"].sum(1) - num_visual
            record = get_drop_record(model) if setting.config is not None else None
            for row in range(len(batch)):
                kept_per_stage.append([len(k) for k in record.kept_visual_indices[row]] if record else [])
                n_visual, n_text = int(num_visual[row]), int(num_text[row])
                flops_paper += paper_flops(*shape, n_visual, setting.config)
                flops_e2e += prefill_flops(model.config, n_text, n_visual, setting.config)
                visual_per_layer += float(record.visual_tokens_per_layer[row].float().mean()) if record else n_visual
            bar.update(len(batch))
        count = len(examples)
        rows.append(
            {
                "method": setting.method,
                "settings": setting.settings,
                **_accuracy_fields(examples, correct if labelled else None),
                "flops_paper": flops_paper / count,
                "flops_e2e": flops_e2e / count,
                "avg_visual_tokens": visual_per_layer / count,
                "prefill_ms": statistics.median(prefill_ms),
                "batch_size": batch_size,
                "n": count,
            }
        )
        logprobs = torch.cat(first_logprobs)
        if index == 0 and setting.method == "none":
            reference_logprobs, reference_answers = logprobs, predictions
        if reference_logprobs is not None:
            rows[-1].update(_loyalty(predictions, reference_answers, logprobs, reference_logprobs))
        rows[-1]["kept_per_stage"] = kept_per_stage
        answers[index] = predictions
    bar.close()
    use_drop(model, None)
    baseline = next((row for row in rows if row["method"] == "none"), None)
    for row in rows:
        row["retention"] = row["accuracy"] / baseline["accuracy"] if baseline and baseline["accuracy"] else None
    for reference in references if labelled else ():
        add_paired_differences(rows, reference)
    return rows, answers


def _accuracy_fields(examples: list[dict], correct: list[bool] | None) -> dict:
    """Accuracy with its Wilson interval, overall and per type, and the 0/1 list; all None without answers."""
    if correct is None:
        names = ("accuracy", "ci_low", "ci_high", "accuracy_per_type", "accuracy_per_type_ci", "correct")
        return dict.fromkeys(names)
    per_type: dict[str, list[bool]] = {}
    for example, ok in zip(examples, correct):
        per_type.setdefault(example.get("type", "all"), []).append(ok)
    ci_low, ci_high = wilson_interval(sum(correct), len(correct))
    return {
        "accuracy": sum(correct) / len(correct),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "accuracy_per_type": {name: sum(v) / len(v) for name, v in sorted(per_type.items())},
        "accuracy_per_type_ci": {name: list(wilson_interval(sum(v), len(v))) for name, v in sorted(per_type.items())},
        "correct": [int(ok) for ok in correct],
    }


def _loyalty(predictions: list[str], reference: list[str], logprobs: torch.Tensor, reference_logprobs: torch.Tensor):
    """Agreement with the no-drop row: identical answers, same first token, KL of the first token's distribution."""
    same = [a == b for a, b in zip(predictions, reference)]
    low, high = wilson_interval(sum(same), len(same))
    kl = (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).clamp(min=0)
    return {
        "loyalty": sum(same) / len(same),
        "loyalty_ci": [low, high],
        "first_token_agreement": float((logprobs.argmax(-1) == reference_logprobs.argmax(-1)).float().mean()),
        "first_token_kl": float(kl.mean()),
    }


def add_paired_differences(
    rows: list[dict], reference: str, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> None:
    """Give every row `diff_vs_<reference>` (accuracy minus the reference's, as a fraction), its 95 % paired
    bootstrap interval `diff_vs_<reference>_ci` [low, high] and the exact McNemar `mcnemar_p_vs_<reference>`.

    The reference is the first row whose method is `reference` (nothing happens without one); its own fields
    are None. Paired, because every row answered the same questions: the differences are far better resolved
    than the two accuracies' own intervals suggest.
    """
    base = next((row for row in rows if row["method"] == reference), None)
    if base is None:
        return
    for row in rows:
        fields = {"diff": None, "ci": None, "p": None}
        if row is not base:
            diff, low, high = paired_bootstrap_diff(row["correct"], base["correct"], resamples, seed)
            fields = {"diff": diff, "ci": [low, high], "p": mcnemar_exact(row["correct"], base["correct"])}
        row[f"diff_vs_{reference}"] = fields["diff"]
        row[f"diff_vs_{reference}_ci"] = fields["ci"]
        row[f"mcnemar_p_vs_{reference}"] = fields["p"]


def excludes_zero(interval: list[float] | tuple[float, float] | None) -> bool:
    """Whether a difference's interval lies entirely on one side of 0 (the tables mark these with `*`)."""
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def format_difference(diff: float | None, interval: list[float] | None) -> str:
    """A difference in points with its interval, `*` when the interval excludes 0: `-3.2 [-5.1, -1.4]*`."""
    if diff is None or interval is None:
        return "-"
    star = "*" if excludes_zero(interval) else ""
    return f"{100 * diff:+.1f} [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]{star}"


def format_table(rows: list[dict]) -> str:
    """The results table: one line per row, then how many questions and what the intervals are.

    `95% CI` is the accuracy's Wilson interval; each `Δ <method>` column (one per reference row present, no
    drop and, with `--budget`, PyramidDrop) is the paired difference in points with its bootstrap interval and
    McNemar p, `*` when the interval excludes 0.
    """
    references = [name for name in ("none", "pdrop") if any(row.get(f"diff_vs_{name}_ci") for row in rows)]
    header = (
        f"{'method':<8} {'settings':<44} {'acc':>6} {'95% CI':>13} {'retain':>7} {'loyal':>6} {'KL':>6} {'paper FLOPs':>11} "
        f"{'e2e FLOPs':>10} {'vis tok/layer':>13} {'prefill ms':>10}"
    )
    header += "".join(f"  {'Δ ' + name:<22} {'p':>7}" for name in references)
    lines = [f"{rows[0]['n']} questions, the same for every row", header, "-" * len(header)]
    for row in rows:
        settings = row["settings"]
        if "layer_list" in settings:
            text = f"{settings['layer_list']} {[round(r, 3) for r in settings['image_token_ratio_list']]}"
            text += f" {settings['position_mode']}"
        else:
            text = "visual tokens replaced by noise" if row["method"] == NOISE else "all visual tokens"
        retention = f"{row['retention']:.1%}" if row.get("retention") is not None else "-"
        labelled = row["accuracy"] is not None
        interval = f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]" if labelled else "-"
        accuracy = f"{row['accuracy']:.1%}" if labelled else "-"
        loyal = f"{row['loyalty']:.1%}" if row.get("loyalty") is not None else "-"
        kl = f"{row['first_token_kl']:.3f}" if row.get("first_token_kl") is not None else "-"
        line = (
            f"{row['method']:<8} {text[:44]:<44} {accuracy:>6} {interval:>13} {retention:>7} {loyal:>6} {kl:>6} "
            f"{row['flops_paper']:>11.3g} {row['flops_e2e']:>10.3g} {row['avg_visual_tokens']:>13.1f} "
            f"{row['prefill_ms']:>10.1f}"
        )
        for name in references:
            p_value = row.get(f"mcnemar_p_vs_{name}")
            difference = format_difference(row.get(f"diff_vs_{name}"), row.get(f"diff_vs_{name}_ci"))
            line += f"  {difference:<22} {'-' if p_value is None else f'{p_value:.3g}':>7}"
        lines.append(line.rstrip())
    footer = (
        "95% CI: Wilson score interval of the accuracy (in %). loyal: answers identical to no drop's; KL: mean"
        " KL(no drop || row) of the first answer token's distribution, nats."
    )
    if references:
        footer += (
            f" Δ: paired difference in points, 95% paired-bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of"
            " the questions), * = the interval excludes 0; p: exact McNemar test."
        )
    lines.append(footer)
    return "\n".join(lines)
