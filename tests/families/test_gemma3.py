"""Gemma 3 specifics on a tiny random-weight model with inputs from its own processor: the soft tokens of one
image (or pan-and-scan crop) attend to each other both ways, local (sliding) and global layers interleave with
their own rotary bases. After a drop, the kept image tokens must keep their bidirectional block and every layer
type its own mask and rotary embedding; ranking must see what the layer's own attention sees."""

from dataclasses import replace

import pytest
import torch
from generation_checks import greedy
from tiny_families import FAMILIES, tiny_gemma3
from tiny_processors import images, processed
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop

# Layers 0, 1, 3, 4 slide (window 12), 2 and 5 are global: drops before global layers, or before sliding ones.
PDROP = PyramidDropConfig(layer_list=[2, 5], image_token_ratio_list=[0.5, 0.25])
SLIDING = PyramidDropConfig(layer_list=[1, 4], image_token_ratio_list=[0.5, 0.25])


def gemma3_samples() -> list[dict]:
    """Unpadded processor outputs: a square image (one block), a wide one (the original plus two crops: three
    blocks), and both in one prompt."""
    processor = FAMILIES["gemma3"].processor()
    square, wide = images(FAMILIES["gemma3"].image_sizes)
    prompts = [("w5 w6 w7", [square]), ("w8 w9", [wide]), ("w10 w11", [wide, square])]
    return [processed(processor, [text], [pictures]) for text, pictures in prompts]


def rebuilt_logits(model, sample: dict, kept: list[torch.Tensor], config: PyramidDropConfig, blocks: bool = True):
    """The dropped forward rebuilt from the unpatched model's own modules and Gemma 3's own mask builder: stage 0
    runs unpatched; at each boundary the recorded kept tokens are gathered with their block ids, and the later
    layers get the masks `create_masks_for_vision_model` makes for them and the rotary embedding of their layer
    type at the kept tokens' positions."""
    language_model = model.model.language_model
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    handle = language_model.layers[config.layer_list[0]].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**sample)
    handle.remove()

    ids = sample["input_ids"][0]
    visual = ids == model.config.image_token_id
    pool = visual.nonzero()[:, 0]
    block_ids = get_block_sequence_ids_for_mask(sample["token_type_ids"])[0]
    hidden, source = captured["hidden"], torch.arange(ids.shape[0])
    types = language_model.config.layer_types
    boundaries = [*config.layer_list, len(language_model.layers)]
    with torch.no_grad():
        for stage, (start, end) in enumerate(zip(boundaries, boundaries[1:]), start=1):
            keep = ~visual[source] | torch.isin(source, pool[kept[stage]])
            hidden, source = hidden[:, keep], source[keep]
            positions = source[None] if config.position_mode == "original" else torch.arange(source.shape[0])[None]
            stage_blocks = block_ids[source][None] if blocks else torch.full_like(source[None], -1)
            masks = create_masks_for_vision_model(
                language_model.config, hidden, torch.ones_like(source[None]), None, positions, stage_blocks
            )
            for layer in range(start, end):
                rotary = language_model.rotary_emb(hidden, positions, types[layer])
                hidden = language_model.layers[layer](
                    hidden, attention_mask=masks[types[layer]], position_embeddings=rotary
                )
        return model.lm_head(language_model.norm(hidden))


@pytest.mark.parametrize("attn,position_mode", [("eager", "original"), ("sdpa", "compact")])
@pytest.mark.parametrize("config", [PDROP, SLIDING], ids=["global-boundaries", "sliding-boundaries"])
def test_gemma3_dropped_forward_equals_the_rebuild_with_bidirectional_blocks(config, attn, position_mode):
    model = tiny_gemma3(attn)
    config = replace(config, position_mode=position_mode)
    for sample in gemma3_samples():
        apply_pyramid_drop(model, config)
        with torch.no_grad():
            dropped = model(**sample).logits
        kept = get_drop_record(model).kept_visual_indices[0]
        assert len(kept[2]) < len(kept[0])
        remove_pyramid_drop(model)
        rebuilt = rebuilt_logits(model, sample, kept, config)
        assert rebuilt.shape == dropped.shape
        assert (rebuilt - dropped).abs().max().item() < 1e-5
        # The blocks matter: the same kept tokens with causal-only masks give other logits.
        causal_only = rebuilt_logits(model, sample, kept, config, blocks=False)
        assert (causal_only - dropped).abs().max().item() > 1e-4


@pytest.mark.parametrize("config", [PDROP, SLIDING], ids=["global-boundaries", "sliding-boundaries"])
def test_gemma3_ranking_equals_brute_force_attention(config):
    """Kept sets equal the top of the ranking layer's own eager attention (`output_attentions`, the model's own
    bidirectional and sliding masks), last prompt row, mean over heads; ties (keys a sliding window hides get
    exactly 0) go to the earlier token, as the engine breaks them."""
    model = tiny_gemma3("eager", sliding_window=24)
    for sample in gemma3_samples():
        apply_pyramid_drop(model, config)
        with torch.no_grad():
            model(**sample)
        expected = get_drop_record(model).kept_visual_indices[0]
        visual = sample["input_ids"][0] == model.config.image_token_id
        count = int(visual.sum())
        for stage, layer in enumerate(config.layer_list, start=1):
            # The model dropping only before `layer`'s stage: its attentions at `layer` see the survivors.
            earlier = replace(
                config,
                layer_list=config.layer_list[: stage - 1] or [layer + 1],
                image_token_ratio_list=config.image_token_ratio_list[: stage - 1] or [1.0],
            )
            apply_pyramid_drop(model, earlier)
            with torch.no_grad():
                attentions = model(**sample, output_attentions=True).attentions
            source = get_drop_record(model).kept_positions[0]
            is_visual = (source >= 0) & visual[source.clamp(min=0)]
            scores = attentions[layer][0, :, -1].mean(0)[is_visual]
            survivors = expected[stage - 1]
            keep = int(count * config.image_token_ratio_list[stage - 1])
            order = torch.sort(scores, descending=True, stable=True).indices[:keep]
            assert survivors[order].sort().values.tolist() == expected[stage].tolist(), f"stage {stage}"
        remove_pyramid_drop(model)


def test_gemma3_rejects_text_models_it_cannot_rank():
    with pytest.raises(ValueError, match=r"caps its attention logits \(attn_logit_softcapping=50.0\)"):
        apply_pyramid_drop(tiny_gemma3(attn_logit_softcapping=50.0), PDROP)
    with pytest.raises(ValueError, match=r"attends bidirectionally everywhere \(use_bidirectional_attention=True"):
        apply_pyramid_drop(tiny_gemma3(use_bidirectional_attention=True), PDROP)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_rerank_follow_up_equals_a_fresh_prefill_of_the_whole_conversation(attn):
    """conversation='rerank': the follow-up re-ranks with the whole conversation from the first dropping layer on;
    the image blocks of the first turn stay bidirectional there (the follow-up call carries no token_type_ids)."""
    model = tiny_gemma3(attn)
    processor = FAMILIES["gemma3"].processor()
    square, wide = images(FAMILIES["gemma3"].image_sizes)
    batch = processed(processor, ["w5 w6 w7", "w8 w9"], [[square], [wide]])
    apply_pyramid_drop(model, replace(PDROP, conversation="rerank"))
    first = greedy(model, batch, 4)
    follow_up = torch.randint(4, 60, (2, 5), generator=torch.Generator().manual_seed(3))
    conversation = torch.cat([first.sequences, follow_up], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(conversation[:, batch["attention_mask"].shape[1] :])], 1)
    out = greedy(model, {"input_ids": conversation, "attention_mask": mask}, 4, cache=first.cache)
    kept = get_drop_record(model).kept_visual_indices
    types = torch.cat([batch["token_type_ids"], torch.zeros_like(mask[:, batch["token_type_ids"].shape[1] :])], 1)
    fresh_inputs = {"input_ids": conversation, "attention_mask": mask, "token_type_ids": types}
    fresh = greedy(model, fresh_inputs | {"pixel_values": batch["pixel_values"]}, 4)
    assert out.sequences.tolist() == fresh.sequences.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, fresh.logits)) < 3e-5
    fresh_kept = get_drop_record(model).kept_visual_indices
    assert all(torch.equal(a, b) for row, fresh_row in zip(kept, fresh_kept) for a, b in zip(row, fresh_row))
