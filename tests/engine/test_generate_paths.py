"""Every way of calling generate() under PyramidDrop: the same tokens as its reference, or a clear error first.

References: plain greedy decoding under PyramidDrop for assisted decoding, prompt lookup and use_cache=False;
each sample alone for beam search; a full forward of the whole sequence (ranked with the prompt's last token)
for sampling and for continuing a conversation from a returned cache.
"""

import copy
from dataclasses import replace

import pytest
import torch
from generation_checks import generate_positions
from tiny_models import llava_batch, sample, tiny_llava
from transformers.cache_utils import DynamicCache

from pyramiddrop import (
    PyramidDropConfig,
    apply_pyramid_drop,
    get_drop_record,
    ranking_prompt_length,
)
from pyramiddrop.methods import config_fields

STEPS = 8
PDROP = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25])
PROMPTS = [(3, 1, 6), (1, 1, 2), (5, 2, 4)]
# DART, SparseVLM and VisPruner as released rank one image per sample: their rows have one image each.
ONE_IMAGE_PROMPTS = [(3, 1, 6), (1, 1, 2), (5, 1, 4)]
METHODS = ["pdrop", "fastv", "dart", "pivot-duplication", "random", "sparsevlm", "sparsevlm-norecycle"]
ONE_IMAGE_METHODS = ("dart", "sparsevlm", "sparsevlm-norecycle", "vispruner@0")
PRE_LLM = ["divprune@0", "pool@0", "vispruner@0", "conditional-dpp@0"]  # one drop before the first layer
# One forward vs cached decoding differ by float32 noise of ~2e-5 on these logits (of size ~2) with no drop too.
TOLERANCE = 1e-4


def _config(method="pdrop", position_mode="compact"):
    if method == "fastv":  # FastV as released: one drop, layer K-1's attention, original positions always
        return PyramidDropConfig.fastv(2, 0.25)
    if method == "dart":  # DART as released: one drop, layer K-1's keys and output, original positions always
        return PyramidDropConfig([2], [0.25], method="dart", position_mode="original")
    if method.startswith("sparsevlm"):  # as released: ranked in the layers before the drops, compact positions always
        return replace(PDROP, method=method)
    if method in ("vispruner@0", "conditional-dpp@0"):  # as released: compact positions always
        return PyramidDropConfig([0], [0.25], **config_fields(method[:-2]))
    if method.endswith("@0"):
        return PyramidDropConfig([0], [0.25], method=method[:-2], position_mode=position_mode)
    return replace(PDROP, method=method, position_mode=position_mode)


def _prompts(method):
    return ONE_IMAGE_PROMPTS if method in ONE_IMAGE_METHODS else PROMPTS


def model_config(model):
    return PyramidDropConfig.from_dict(model.config.pyramid_drop)


def _model(config, attn="sdpa", kv_heads=2):
    # No image token among the outputs: the references re-run the generated sequence with its pixels.
    return apply_pyramid_drop(tiny_llava(attn, kv_heads, text_only_output=True), config)


def generate(model, batch, steps=STEPS, **kwargs):
    options = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    with torch.no_grad():
        return model.generate(**batch, **(options | kwargs), return_dict_in_generate=True, output_logits=True)


def new_tokens(out, batch):
    return out.sequences[:, batch["input_ids"].shape[1] :]


def full_forward_logits(model, batch, sequences, prompt_length):
    """Logits of every position of `sequences` from one forward without cache, ranked with the prompt's end, at the
    positions generate() gives a left-padded batch (DART's key norms, after RoPE, depend on absolute positions)."""
    mask = torch.cat(
        [batch["attention_mask"], torch.ones(len(sequences), sequences.shape[1] - prompt_length, dtype=torch.long)], 1
    )
    with torch.no_grad(), ranking_prompt_length(model, prompt_length):
        return model(
            input_ids=sequences,
            attention_mask=mask,
            pixel_values=batch.get("pixel_values"),
            position_ids=generate_positions(mask),
            use_cache=False,
        ).logits


class _InputLengths:
    """Counts the language model's calls and the new tokens of each."""

    def __init__(self, model):
        self.lengths = []
        self.handle = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: self.lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
        )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("attn,kv_heads", [("sdpa", 2), ("eager", 4)], ids=["sdpa-gqa", "eager-mha"])
def test_prompt_lookup_decoding_equals_greedy(method, position_mode, attn, kv_heads, monkeypatch):
    model = _model(_config(method, position_mode), attn, kv_heads)
    batch = sample(llava_batch(PROMPTS), 0)
    reference = generate(model, batch, steps=12)
    kept = get_drop_record(model).kept_visual_indices
    apply_pyramid_drop(model, model_config(model))  # a fresh engine: random selection draws the same numbers again
    crops = []
    original_crop = DynamicCache.crop
    monkeypatch.setattr(DynamicCache, "crop", lambda self, n: (crops.append(n), original_crop(self, n))[1])
    lengths = _InputLengths(model)
    out = generate(model, batch, steps=12, prompt_lookup_num_tokens=3)
    assert new_tokens(out, batch).tolist() == new_tokens(reference, batch).tolist()
    for stage, indices in enumerate(get_drop_record(model).kept_visual_indices[0]):
        assert torch.equal(indices, kept[0][stage])  # ranked with the prompt's last token, not a candidate's
    assert lengths.lengths[0] > batch["input_ids"].shape[1] and crops  # candidates went in and some were cropped


@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_assistant_model_decoding_equals_greedy(position_mode):
    assistant = tiny_llava("sdpa", 2, seed=1)  # a different model: some of its candidates are rejected
    model = _model(_config("pdrop", position_mode))
    batch = sample(llava_batch(PROMPTS), 2)
    reference = generate(model, batch, steps=12)
    out = generate(model, batch, steps=12, assistant_model=assistant)
    assert new_tokens(out, batch).tolist() == new_tokens(reference, batch).tolist()


def test_chunked_prefill_is_refused_before_any_compute():
    model = _model(PDROP)
    batch = llava_batch(PROMPTS[:1])
    calls = []
    model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="PyramidDrop cannot use chunked prefill.*prefill_chunk_size=None"):
        generate(model, batch, prefill_chunk_size=24)
    assert not calls
    # A chunk that holds the whole prompt is an ordinary prefill.
    whole = generate(model, batch, prefill_chunk_size=batch["input_ids"].shape[1])
    assert new_tokens(whole, batch).tolist() == new_tokens(generate(model, batch), batch).tolist()


def test_visual_tokens_after_the_prefill_are_refused():
    """Chunks fed by hand: the image arrives in the second call, after a prefill ranked without it."""
    model = _model(PDROP)
    batch = llava_batch(PROMPTS[:1])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=ids[:, :2], attention_mask=mask[:, :2], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="visual tokens after the prefill.*prefill_chunk_size=None"):
            model(input_ids=ids[:, 2:], attention_mask=mask, pixel_values=batch["pixel_values"], cache=cache)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("method", ["pdrop", "random", "sparsevlm", "sparsevlm-norecycle"])
def test_beam_search_batch_equals_each_sample_alone(attn, position_mode, method):
    # random: every beam of a prompt draws from the prompt's own seed, so beams agree on the kept tokens.
    model = _model(_config(method, position_mode), attn)
    batch = llava_batch(_prompts(method))
    out = generate(model, batch, num_beams=3, num_return_sequences=2)
    for index in range(len(PROMPTS)):
        alone = sample(batch, index)
        single = generate(model, alone, num_beams=3, num_return_sequences=2)
        assert new_tokens(single, alone).tolist() == new_tokens(out, batch)[2 * index : 2 * index + 2].tolist()


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
def test_sampling_logits_equal_a_full_forward(batch_size, position_mode):
    model = _model(_config("pdrop", position_mode))
    batch = llava_batch(PROMPTS[:batch_size])
    torch.manual_seed(0)
    out = generate(model, batch, do_sample=True, num_return_sequences=2, top_k=0)
    prompt_length = batch["input_ids"].shape[1]
    expanded = {key: value.repeat_interleave(2, 0) for key, value in batch.items() if key != "pixel_values"}
    images = [sample(batch, index)["pixel_values"] for index in range(batch_size)]  # each sample's, twice
    expanded["pixel_values"] = torch.cat([image for image in images for _ in range(2)])
    logits = full_forward_logits(model, expanded, out.sequences[:, :-1], prompt_length)
    for step in range(STEPS):
        # The logits come out as long as the last stage's sequence; the generated tokens are its last STEPS.
        assert (logits[:, step - STEPS] - out.logits[step]).abs().max().item() < TOLERANCE, f"step {step}"


@pytest.mark.parametrize("method", METHODS + PRE_LLM)
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_use_cache_false_equals_cached_decoding(method, position_mode, batch_size):
    """Without a cache every step is a new prefill of the whole sequence, ranked with the prompt's last token."""
    model = _model(_config(method, position_mode))
    batch = llava_batch(_prompts(method)[:batch_size])
    cached = generate(model, batch)
    apply_pyramid_drop(model, model_config(model))  # random selection: the same draws again
    uncached = generate(model, batch, use_cache=False)
    assert new_tokens(uncached, batch).tolist() == new_tokens(cached, batch).tolist()
    for step in range(STEPS):
        assert (uncached.logits[step] - cached.logits[step]).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("options", [dict(cache_implementation="static"), dict(cache_implementation="offloaded")])
def test_static_caches_are_refused_before_any_compute(options):
    model = _model(PDROP)
    calls = []
    model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="PyramidDrop needs a dynamic cache.*cache_implementation='dynamic'"):
        generate(model, llava_batch(PROMPTS[:1]), **options)
    assert not calls


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn,kv_heads", [("sdpa", 2), ("eager", 4)], ids=["sdpa-gqa", "eager-mha"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_continuing_from_a_returned_cache_keeps_the_first_drop(method, attn, kv_heads, position_mode, batch_size):
    """conversation='keep': the follow-up sees the first prefill's kept tokens; equal to one full forward."""
    model = _model(_config(method, position_mode), attn, kv_heads)
    batch = llava_batch(_prompts(method)[:batch_size])
    first = generate(model, batch)
    record = get_drop_record(model)
    follow_up = torch.randint(2, 30, (batch_size, 5), generator=torch.Generator().manual_seed(3))
    conversation = torch.cat([first.sequences, follow_up], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(conversation[:, batch["attention_mask"].shape[1] :])], 1)
    second = generate(model, {"input_ids": conversation, "attention_mask": mask}, cache=first.cache)
    assert get_drop_record(model) is record  # no new prefill
    prompt_length = batch["input_ids"].shape[1]
    sequence = conversation
    for step in range(STEPS):  # the reference: full forwards of the whole conversation, greedy
        apply_pyramid_drop(model, model_config(model))  # random selection: the first turn's draws again
        logits = full_forward_logits(model, batch, sequence, prompt_length)[:, -1]
        assert (logits - second.logits[step]).abs().max().item() < 1e-4, f"step {step}"
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
    assert second.sequences.tolist() == sequence.tolist()


@pytest.mark.parametrize("method", PRE_LLM)
def test_paths_that_read_the_cache_length_are_refused_with_a_drop_before_layer_0(method):
    """generate() reads the cached length from layer 0, which after a pre-LLM drop holds only the kept tokens."""
    model = _model(_config(method))
    batch = llava_batch(PROMPTS[:1])
    message = r"a drop before the first layer \(layer_list\[0\] == 0\) cannot take {}"
    with pytest.raises(ValueError, match=message.format("prompt_lookup_num_tokens")):
        generate(model, batch, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match=message.format("assistant_model")):
        generate(model, batch, assistant_model=tiny_llava(text_only_output=True))
    first = generate(model, batch)
    conversation = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], 1)
    with pytest.raises(ValueError, match=message.format("a cache to continue")):
        generate(model, {"input_ids": conversation, "attention_mask": torch.ones_like(conversation)}, cache=first.cache)


def test_a_cache_from_another_prefill_is_refused():
    model = _model(PDROP)
    batch = llava_batch(PROMPTS[:1])
    first = generate(model, batch)
    generate(model, llava_batch(PROMPTS[1:2]))  # a newer prefill: its tables replace the first one's
    with pytest.raises(ValueError, match="continue from the cache its own last prefill"):
        generate(model, {"input_ids": first.sequences}, cache=first.cache)
    stale = copy.deepcopy(first.cache)
    with pytest.raises(ValueError, match="continue from the cache its own last prefill"):
        generate(model, {"input_ids": first.sequences}, cache=stale)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_rerank_conversation_equals_a_fresh_prefill_of_the_whole_conversation(attn, position_mode, batch_size):
    model = _model(replace(_config("pdrop", position_mode), conversation="rerank"), attn)
    batch = llava_batch(PROMPTS[:batch_size])
    first = generate(model, batch)
    first_kept = get_drop_record(model).kept_visual_indices
    sequences, mask, cache = first.sequences, batch["attention_mask"], first.cache
    turns = []
    for turn in range(2):  # two follow-up turns on the same cache
        follow_up = torch.randint(2, 30, (batch_size, 5), generator=torch.Generator().manual_seed(3 + turn))
        conversation = torch.cat([sequences, follow_up], 1)
        mask = torch.cat([mask, torch.ones_like(conversation[:, mask.shape[1] :])], 1)
        out = generate(model, {"input_ids": conversation, "attention_mask": mask}, cache=cache)
        turns.append((conversation, mask, out, get_drop_record(model).kept_visual_indices))
        sequences, cache = out.sequences, out.cache
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(turns[0][3], first_kept))  # the new question ranked
    for conversation, mask, out, kept in turns:  # the reference: a fresh prefill of the whole conversation
        fresh = generate(
            model, {"input_ids": conversation, "attention_mask": mask, "pixel_values": batch["pixel_values"]}
        )
        assert out.sequences.tolist() == fresh.sequences.tolist()
        for step in range(STEPS):
            assert (out.logits[step] - fresh.logits[step]).abs().max().item() < TOLERANCE, f"step {step}"
        fresh_kept = get_drop_record(model).kept_visual_indices
        assert all(torch.equal(a, b) for row, fresh_row in zip(kept, fresh_kept) for a, b in zip(row, fresh_row))


def test_a_deep_copy_generates_with_its_own_engine():
    model = _model(PDROP)
    clone = copy.deepcopy(model)
    batch = llava_batch(PROMPTS[:1])
    out = generate(clone, batch, prompt_lookup_num_tokens=3)  # needs the prompt length: the clone's own wrapper
    assert get_drop_record(model) is None and get_drop_record(clone) is not None
    assert new_tokens(out, batch).tolist() == new_tokens(generate(model, batch), batch).tolist()


def test_decoding_from_the_cache_a_forward_made_itself():
    """A prefill called without a cache (the model creates one inside) can be continued from its output."""
    model = _model(PDROP)
    batch = llava_batch(PROMPTS[:1])
    with torch.no_grad():
        out = model(**batch, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
        step = model(input_ids=token, attention_mask=mask, cache=out.past_key_values, logits_to_keep=1)
    reference = generate(model, batch, steps=2)
    assert (step.logits[:, -1] - reference.logits[1]).abs().max().item() < TOLERANCE
