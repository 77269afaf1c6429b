"""CDPruner (Theia-4869/CDPruner) needs CLIP's text tower, so `method="cdpruner"` is refused; `conditional-dpp` runs
the release's selection with the language model's input embeddings in its place. The oracle transcribes the
release's selection and feeds it those embeddings.

Transcribed: the `[CDPruner]` lines of `LlavaMetaForCausalLM.encode_images` in `llava/model/llava_arch.py` at the
authors' commit 9541616c (2025-09-20): cosine similarity of the projected features, relevance from `image_embeds`
and `text_embeds` with its min-max normalisation, the kernel and the fast greedy MAP loop, on one image (B = 1). Its
`image_embeds` (CLIP's projected patches) become the projected visual tokens and its `text_embeds` (CLIP's text
embeddings of the question) the input embeddings of the prompt's tokens after the image: the variant's one change.
"""

import pytest
import torch
from generation_checks import assert_rows_equal_alone
from tiny_models import IMAGE_TOKEN_ID, language_model_input, llava_batch, sample, tiny_llava

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record

PROMPTS = [(3, 1, 6), (1, 1, 4), (5, 1, 3), (2, 0, 4)]
NUM_VISUAL = 64


def released_selection(image_features, image_embeds, text_embeds, visual_token_num, conditional=True):
    """The release's `encode_images` from the projected `image_features` ([B, N, D]) to its sorted `select_idx`;
    `conditional=False` leaves the relevance out (an unconditioned DPP, to show the condition matters)."""
    B, N, C = image_features.shape  # noqa: N806 (the release's names)
    device = image_features.device
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if not conditional:
        relevance = torch.ones_like(relevance)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N), device=device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (
            kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])
        ) / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    select_idx = torch.sort(select_idx.t()).values
    return select_idx


def _expected(model, batch, keep, **options):
    """Per row with an image: the oracle's kept indices among the row's visual tokens."""
    embeds = language_model_input(model, batch)
    expected = {}
    for row in range(embeds.shape[0]):
        real = batch["attention_mask"][row].bool()
        visual = (batch["input_ids"][row] == IMAGE_TOKEN_ID) & real
        if not visual.any():
            continue
        positions = torch.arange(visual.numel())
        instruction = real & (positions > positions[visual].max())
        features = embeds[row][visual][None]
        selected = released_selection(features, features, embeds[row][instruction], keep, **options)
        expected[row] = selected[0].tolist()
    return expected


def _config(ratio):
    return PyramidDropConfig([0], [ratio], method="conditional-dpp", query="instruction_mean")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("keep", [8, 16, 24, 40])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_conditional_dpp_keeps_the_release_selection_on_the_llm_embeddings(seed, keep, attn):
    model = tiny_llava(attn, seed=seed)
    batch = llava_batch(PROMPTS, seed=seed)
    expected = _expected(model, batch, keep)
    apply_pyramid_drop(model, _config((keep + 0.5) / NUM_VISUAL))
    with torch.no_grad():
        model(**batch)
    record = get_drop_record(model)
    for row, kept in expected.items():
        assert record.kept_visual_indices[row][1].tolist() == kept


def test_the_instruction_changes_the_selection():
    """The oracle comparison can fail: the same image with another question keeps other tokens, and the DPP without
    the relevance keeps others again."""
    model = tiny_llava(seed=1)
    first = llava_batch([(3, 1, 6)], seed=1)
    second = {**first, "input_ids": first["input_ids"].clone()}
    second["input_ids"][0, -6:] = torch.tensor([5, 9, 17, 33, 41, 60])
    kept = [_expected(model, batch, 16)[0] for batch in (first, second)]
    unconditioned = _expected(model, first, 16, conditional=False)[0]
    assert kept[0] != kept[1] and kept[0] != unconditioned
    apply_pyramid_drop(model, _config(16.5 / NUM_VISUAL))
    for batch, expected in zip((first, second), kept):
        with torch.no_grad():
            model(**batch)
        assert get_drop_record(model).kept_visual_indices[0][1].tolist() == expected


@pytest.mark.parametrize("seed", range(2))
def test_padded_batch_equals_each_row_alone(seed):
    model = apply_pyramid_drop(tiny_llava(text_only_output=True), _config(0.3))
    prompts = [*PROMPTS, (1, 2, 2)]  # a sample's two images form one group
    batch = llava_batch(prompts, seed=seed)
    samples = [sample(batch, row) for row in range(len(prompts))]
    assert_rows_equal_alone(model, batch, samples, steps=4, tol=1e-4)


def test_cdpruner_is_refused_with_what_to_use_instead():
    with pytest.raises(ValueError, match=r"method 'cdpruner' .* CLIP's text tower .* method='conditional-dpp'"):
        PyramidDropConfig([0], [0.25], method="cdpruner")


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(query="last"), r"conditions on the instruction .* pass query='instruction_mean'"),
        (dict(layer_list=[2]), r"drops once, before the language model.*\[2\]"),
        (dict(position_mode="original"), r"renumbers the kept tokens' positions"),
    ],
)
def test_settings_without_a_counterpart_are_refused(fields, message):
    config = dict(layer_list=[0], image_token_ratio_list=[0.25], method="conditional-dpp", query="instruction_mean")
    with pytest.raises(ValueError, match=f"method 'conditional-dpp' {message}"):
        PyramidDropConfig(**(config | fields))


def test_a_sample_without_text_after_its_image_keeps_every_visual_token():
    """No instruction to condition on: the engine's rule for samples without query rows, in a batch or alone."""
    model = apply_pyramid_drop(tiny_llava(), _config(0.25))
    batch = llava_batch([(2, 1, 3), (3, 1, 2)])
    last_image = int((batch["input_ids"][1] == IMAGE_TOKEN_ID).nonzero().max())
    batch["attention_mask"][1, last_image + 1 :] = 0  # row 1 ends with its image (right padding)
    with torch.no_grad():
        model(**batch)
    kept = get_drop_record(model).kept_visual_indices
    assert len(kept[0][1]) == 16 and kept[1][1].tolist() == list(range(NUM_VISUAL))


def test_the_greedy_stops_where_no_positive_residual_is_left():
    """A duplicate of the first pick has residual exactly 0 once the two directions are taken: the release's next step
    would divide by its square root (0); here the picks stop and the duplicate is never picked."""
    from pyramiddrop.scoring.dpp import greedy_map_order

    vectors = torch.tensor([[2.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    kernel = (vectors @ vectors.T)[None]
    order = greedy_map_order(kernel, torch.ones(1, 3, dtype=torch.bool), steps=3)
    assert order.tolist() == [[0, 1, 3]]  # 3: never picked
