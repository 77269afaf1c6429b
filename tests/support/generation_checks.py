"""Shared pieces of the equivalence tests (and benchmarks/gpu_checks.py): greedy decoding that keeps each step's
logits, the check that a padded batch decodes each row as that row alone, the no-cache recompute that cached
decoding must match, and a scorer that replays a recorded run's kept visual tokens (a longer sequence would rank
again, so the recompute must keep the same set to be comparable)."""

from __future__ import annotations

import torch

from pyramiddrop import get_drop_record
from pyramiddrop.scoring import register_scorer


def greedy(model, batch: dict, steps: int, **generate_kwargs):
    """Exactly `steps` greedy tokens, with the logits of every step."""
    with torch.no_grad():
        return model.generate(
            **batch,
            **generate_kwargs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )


def assert_rows_equal_alone(model, batch: dict, samples: list[dict], steps: int, tol: float) -> None:
    """Row i of the padded `batch`, generated alone as `samples[i]`: the same tokens, every step's logits within
    `tol`, and the same kept visual tokens at every stage."""
    out = greedy(model, batch, steps)
    batch_record = get_drop_record(model)
    for row, alone in enumerate(samples):
        single = greedy(model, alone, steps)
        assert single.sequences[0, -steps:].tolist() == out.sequences[row, -steps:].tolist()
        for step in range(steps):
            assert (single.logits[step][0] - out.logits[step][row]).abs().max().item() < tol
        record = get_drop_record(model)
        for stage, kept in enumerate(batch_record.kept_visual_indices[row]):
            assert torch.equal(record.kept_visual_indices[0][stage], kept)


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """The 1-D positions `generate()` gives a left-padded batch (padding at position 1)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def full_recompute(model, batch: dict, sequences: torch.Tensor, step: int) -> torch.Tensor:
    """Last-position logits of a no-cache forward over prompt + `step` generated tokens.

    Qwen models (batches with `mm_token_type_ids`) derive their 3-D positions from the whole sequence
    (`get_rope_index`); the others get `generate()`'s left-padding-aware positions. Generated tokens are text.
    """
    prompt_length = batch["input_ids"].shape[1]
    ids = sequences[:, : prompt_length + step]
    extra = torch.ones(ids.shape[0], step, dtype=torch.long, device=ids.device)
    mask = torch.cat([batch["attention_mask"], extra], dim=1)
    inputs = dict(batch, input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in batch:
        inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], extra * 0], dim=1)
    else:
        inputs["position_ids"] = generate_positions(mask)
    if "token_type_ids" in batch:  # Gemma 3
        inputs["token_type_ids"] = torch.cat([batch["token_type_ids"], extra * 0], dim=1)
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[:, -1]


def assert_cached_equals_recompute(model, batch: dict, config, replay: tuple[str, dict], steps: int, tol: float):
    """Cached greedy decoding under `config` equals a no-cache recompute of every step (the recompute keeps the
    recorded kept set through `replay`, a `(name, record)` of `replay_scorer`). Returns the run's record."""
    from dataclasses import replace

    from pyramiddrop import apply_pyramid_drop

    name, replayed = replay
    apply_pyramid_drop(model, config)
    out = greedy(model, batch, steps)
    record = get_drop_record(model)
    replayed["kept"] = record.kept_visual_indices
    assert all(len(kept[-1]) < len(kept[0]) for kept in replayed["kept"])
    apply_pyramid_drop(model, replace(config, method=name))
    prompt_length = batch["input_ids"].shape[1]
    for step in range(steps):
        logits = full_recompute(model, batch, out.sequences, step)
        assert (logits - out.logits[step]).abs().max().item() < tol, f"step {step}"
        assert torch.equal(logits.argmax(-1), out.sequences[:, prompt_length + step])
    return record


def assert_generate_equals_ranked_recompute(model, batch: dict, steps: int, tol: float) -> None:
    """Cached greedy decoding equals one no-cache forward over prompt + generated tokens that ranks with the prompt
    alone (`ranking_prompt_length`): the same kept tokens, every step's logits within `tol`."""
    from pyramiddrop import ranking_prompt_length

    out = greedy(model, batch, steps)
    kept = get_drop_record(model).kept_visual_indices
    prompt_length = batch["input_ids"].shape[1]
    extra = torch.ones(len(batch["input_ids"]), steps - 1, dtype=torch.long)
    mask = torch.cat([batch["attention_mask"], extra], 1)
    with torch.no_grad(), ranking_prompt_length(model, prompt_length):
        logits = model(
            input_ids=out.sequences[:, :-1],
            attention_mask=mask,
            pixel_values=batch["pixel_values"],
            position_ids=generate_positions(mask),
            use_cache=False,
        ).logits
    assert [[s.tolist() for s in row] for row in get_drop_record(model).kept_visual_indices] == [
        [s.tolist() for s in row] for row in kept
    ]
    for step in range(steps):
        assert (logits[:, step - steps] - out.logits[step]).abs().max().item() < tol, f"step {step}"


def replay_scorer(name: str) -> dict:
    """Registers scoring method `name`: 1 for the visual tokens a recorded run kept at each stage, so the same set
    is kept again. Returns the record to fill: `record["kept"] = get_drop_record(model).kept_visual_indices`."""
    record: dict = {}

    @register_scorer(name)
    def replay_scores(inputs):
        scores = torch.zeros(inputs.visual_index.shape, device=inputs.visual_index.device)
        for row, kept in enumerate(record["kept"]):
            scores[row] = torch.isin(inputs.visual_index[row], kept[inputs.stage].to(scores.device)).float()
        return scores

    return record
