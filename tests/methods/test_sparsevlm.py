"""`method="sparsevlm"` is SparseVLM as released; `sparsevlm-norecycle` is it without its token recycling.

Oracle: Gumpest/SparseVLMs at b9619e61 (tag v1.5): `LlamaDynamicvitModel.forward` in
`llava/model/language_model/modelling_sparse_llama.py` (raters, pruning layers, recycling, gathering, positions), the
attention rows of `LlamaDynamicvitFlashAttention2.forward` (`return_logits`), `attn_postprocess_topk` in `score.py`
and `cluster_and_merge` in `utils.py` (einops' rearrange written as indexing), transcribed below on one unpadded sample;
`sparsevlm-norecycle` is checked against it with the recycling branch (`if s_flag and ...`) turned off.
"""

import math

import pytest
import torch
from generation_checks import (
    assert_generate_equals_ranked_recompute,
    assert_rows_equal_alone,
    generate_positions,
)
from tiny_models import IMAGE_TOKEN_ID, language_model_input, llava_batch, sample, tiny_llava, tiny_qwen2_vl
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.flops import tokens_per_layer
from pyramiddrop.methods import sparsevlm_recycled
from pyramiddrop.scoring.sparsevlm import density_peak_clusters

PROMPTS = [(3, 1, 6), (1, 1, 4), (5, 1, 3)]  # one image each (64 tokens), 6 to 8 text tokens after it
METHOD = "sparsevlm-norecycle"
METHODS = ["sparsevlm", "sparsevlm-norecycle"]


def index_points(points, idx):
    B = points.shape[0]  # noqa: N806 (the release's names)
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).view(view_shape).repeat(repeat_shape)
    return points[batch_indices, idx, :]


def fixed_draw(shape, device=None, dtype=None):
    """A possible `torch.rand` draw: (n - 1 - i) / n, the one `sparsevlm` fixes (earlier candidates win ties)."""
    return (torch.arange(shape[-1] - 1, -1, -1, dtype=dtype) / shape[-1]).expand(shape).to(device)


def cluster_and_merge(x, cluster_num, rand=torch.rand):
    """The release's, returning `index_down` too (the centers: bookkeeping for the comparison); `rand` draws its
    tie noise."""
    B, N, C = x.shape  # noqa: N806
    x1 = x[:, :, None, :]  # ein.rearrange(x, "b l r -> b l () r")
    x2 = x[:, None, :, :]  # ein.rearrange(x, "b l r -> b () l r")
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C**0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = index_points(dist_matrix, index_down)
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    B, N, C = x.shape  # noqa: N806
    idx_token = torch.arange(N)[None, :].repeat(B, 1).to(dist_matrix.device)  # noqa: F841 (unused, as released)
    agg_weight = x.new_ones(B, N, 1)  # noqa: F841
    token_weight = x.new_ones(B, N, 1)
    idx_batch = torch.arange(B, device=x.device)[:, None]
    idx = idx_cluster + idx_batch * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N), source=source.reshape(B * N, C).type(x.dtype))
    x_merged = x_merged.reshape(B, cluster_num, C)
    return x_merged, index_down


def released_sparsevlm(
    model, single: dict, pruning_loc: list[int], counts: list[int], recycle: bool = True, rand=fixed_draw
):
    """The release's forward on one sample: the image indices alive after each pruning layer (a merged token counts
    as its cluster's center) and the last token's logits."""
    lm = model.model.language_model
    hidden_states = language_model_input(model, single)
    image = (single["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    v_token_start, image_shape = int(image[0]), len(image)
    text_token_start, v_token_num = v_token_start + image_shape, image_shape
    alive = list(range(image_shape))  # bookkeeping for the comparison, not in the release
    kept = []
    with torch.no_grad():
        v_t = hidden_states[:, v_token_start:text_token_start, :]
        t_t = hidden_states[:, text_token_start:, :]
        m_v_t = v_t @ t_t.transpose(1, 2)
        m_v_t = m_v_t.softmax(2).mean(1)
        t_token_idx = torch.where(m_v_t > m_v_t.mean())
        position_ids = torch.arange(hidden_states.shape[1])[None]
        for layer_idx, decoder_layer in enumerate(lm.layers):
            length = hidden_states.shape[1]
            cos, sin = lm.rotary_emb(hidden_states, position_ids)
            causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
            layer_outputs = decoder_layer(
                hidden_states, attention_mask=causal, position_ids=position_ids, position_embeddings=(cos, sin)
            )
            layer_outputs = layer_outputs[0] if isinstance(layer_outputs, tuple) else layer_outputs
            if layer_idx not in pruning_loc:
                hidden_states = layer_outputs
                continue
            # LlamaDynamicvitFlashAttention2, return_logits=True (repeat_kv: the tiny model has grouped keys)
            attention = decoder_layer.self_attn
            normed = decoder_layer.input_layernorm(hidden_states)
            query_states = attention.q_proj(normed).view(1, length, -1, attention.head_dim).transpose(1, 2)
            key_states = attention.k_proj(normed).view(1, length, -1, attention.head_dim).transpose(1, 2)
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
            key_states = repeat_kv(key_states, query_states.shape[1] // key_states.shape[1])
            scale_factor = 1 / math.sqrt(query_states.size(-1))
            attn_bias = torch.zeros(length, length).masked_fill(
                torch.ones(length, length).tril().logical_not(), -math.inf
            )
            attn_logits = torch.softmax(query_states @ key_states.transpose(2, 3) * scale_factor + attn_bias, dim=-1)
            # attn_postprocess_topk
            self_attn_weights = attn_logits.mean(1)
            rows = t_token_idx[1] + text_token_start
            relation_vis_text = self_attn_weights[:, rows, v_token_start : v_token_start + v_token_num].mean(1)
            mask = torch.zeros_like(relation_vis_text, dtype=bool)
            _, indices = torch.topk(
                relation_vis_text, min(counts[pruning_loc.index(layer_idx)], v_token_num - 1), dim=1
            )
            mask[0][indices] = 1
            pred_score_vis = mask
            policy = torch.ones(1, length)
            policy[:, v_token_start:text_token_start] = pred_score_vis.float()
            total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
            if recycle and total_sparse_token_idx.shape[1] > 0:
                total_sparse_token = layer_outputs[:, total_sparse_token_idx[0]]  # batch_index_select
                merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
                merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
                merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
                merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
                merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
                cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
                if cluster_num == 0:
                    cluster_num = merge_token_stage2.shape[1]
                merge_sparse_token, index_down = cluster_and_merge(merge_token_stage2, cluster_num, rand)
                select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)
                select_token = layer_outputs[:, select_token_idx[0]]
                select_vis_token_num = int(pred_score_vis.sum())
                hidden_states = torch.cat(
                    (
                        select_token[:, : v_token_start + select_vis_token_num, :],
                        merge_sparse_token,
                        select_token[:, v_token_start + select_vis_token_num :, :],
                    ),
                    dim=1,
                )
                position_ids = position_ids[:, : len(select_token_idx[0]) + cluster_num]
                v_token_num = select_vis_token_num + cluster_num
                centers = merge_token_idx_stage1[merge_token_stage2_idx[index_down[0]]].tolist()
                alive = [alive[i] for i in pred_score_vis[0].nonzero().flatten().tolist()] + [alive[i] for i in centers]
            else:
                select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)
                hidden_states = layer_outputs[:, select_token_idx[0]]
                position_ids = position_ids[:, : len(select_token_idx[0])]
                v_token_num = int(pred_score_vis.sum())
                alive = [alive[i] for i in pred_score_vis[0].nonzero().flatten().tolist()]
            text_token_start = v_token_start + v_token_num
            kept.append(sorted(alive))
        logits = model.lm_head(lm.norm(hidden_states))[0, -1]
    return kept, logits


def config(layers: list[int], counts: list[int], method: str = METHOD, num_visual: int = 64) -> PyramidDropConfig:
    """Drops after the 0-based pruning layers keeping exactly `counts` (`int(N * ratio)` with safe ratios)."""
    return PyramidDropConfig([layer + 1 for layer in layers], [(c + 0.5) / num_visual for c in counts], method=method)


def tiny(attn: str, seed: int):
    return tiny_llava(attn, kv_heads=2, seed=seed)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("layers,counts", [([1], [20]), ([1, 3], [40, 12]), ([2, 3, 4], [33, 17, 5]), ([0, 4], [9, 3])])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", METHODS)
def test_keeps_what_released_sparsevlm_keeps(method, seed, layers, counts, attn):
    """Every row of a padded batch keeps the release's tokens after each pruning layer (with recycling: the kept ones
    and the cluster centers that carry the merged tokens), and ends with its logits."""
    batch = llava_batch(PROMPTS, seed=seed)
    model = apply_pyramid_drop(tiny(attn, seed), config(layers, counts, method))
    with torch.no_grad():
        logits = model(**batch, position_ids=generate_positions(batch["attention_mask"])).logits
    record = get_drop_record(model).kept_visual_indices
    plain = tiny("eager", seed)
    for row in range(len(PROMPTS)):
        expected, expected_logits = released_sparsevlm(
            plain, sample(batch, row), layers, counts, recycle=method == "sparsevlm"
        )
        assert [kept.tolist() for kept in record[row][1:]] == expected
        assert (logits[row, -1] - expected_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keeps_what_the_release_keeps_whatever_its_tie_noise(seed, attn):
    """With 256 visual tokens every drop clusters into 3 or more clusters, where densities do not tie: the release's
    own random draws (`torch.rand`) give the same tokens and logits."""
    layers, counts = [1, 3], [100, 30]  # 5 clusters of 47 candidates, then 3 of 23
    batch = llava_batch(PROMPTS, num_visual=256, seed=seed)
    batch["pixel_values"] = torch.randn(len(PROMPTS), 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    model = apply_pyramid_drop(tiny_llava(attn, 2, seed=seed, image_size=112), config(layers, counts, "sparsevlm", 256))
    with torch.no_grad():
        logits = model(**batch, position_ids=generate_positions(batch["attention_mask"])).logits
    record = get_drop_record(model)
    assert [len(kept) for kept in record.kept_visual_indices[0]] == [256, 105, 33]
    plain = tiny_llava("eager", 2, seed=seed, image_size=112)
    for row in range(len(PROMPTS)):
        torch.manual_seed(100 * seed + row)
        expected, expected_logits = released_sparsevlm(plain, sample(batch, row, 256), layers, counts, rand=torch.rand)
        assert [kept.tolist() for kept in record.kept_visual_indices[row][1:]] == expected
        assert (logits[row, -1] - expected_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("count", [1, 2, 3, 9])
@pytest.mark.parametrize("seed", range(3))
def test_clusters_are_the_release_clusters_with_its_draw_fixed(count, seed):
    """`density_peak_clusters` is `cluster_and_merge` with the draw `(n - 1 - i) / n`: the same centers and means,
    also where densities tie (1 and 2 clusters: every token, or mutual nearest neighbours)."""
    tokens = torch.randn(1, 10 * count + 3, 16, generator=torch.Generator().manual_seed(seed))
    merged, index_down = cluster_and_merge(tokens, count, fixed_draw)
    centers, cluster = density_peak_clusters(tokens[0], count)
    assert centers.tolist() == index_down[0].tolist()
    means = torch.stack([tokens[0][cluster == c].sum(0) / ((cluster == c).sum() + 1e-6) for c in range(count)])
    assert torch.allclose(means, merged[0], atol=1e-6)


def test_recycled_counts_of_the_release_schedules():
    """The release's table plus its recycled tokens: 576 -> 309 -> 204 -> 113 at budget 192; the FLOPs and budgets
    count them in every layer after its drop."""
    stage_sizes = {192: [309, 204, 113], 128: [312, 117, 39], 64: [82, 32, 18]}
    for budget, counts in [(192, [300, 200, 110]), (128, [303, 110, 36]), (64, [66, 30, 17])]:
        sizes, alive = [], 576
        for count in counts:
            alive = count + sparsevlm_recycled(count, alive)
            sizes.append(alive)
        assert sizes == stage_sizes[budget]
        per_layer = tokens_per_layer(32, 576, PyramidDropConfig.sparsevlm(budget))
        assert per_layer == [576] * 3 + [sizes[0]] * 4 + [sizes[1]] * 9 + [sizes[2]] * 16
        assert tokens_per_layer(32, 576, PyramidDropConfig.sparsevlm(budget, recycle=False))[-1] == counts[-1]


def test_the_engine_keeps_the_recycled_counts():
    """The record's visual tokens per layer are what the FLOPs count."""
    config_ = config([1, 3], [20, 5], "sparsevlm")
    model = apply_pyramid_drop(tiny("sdpa", 0), config_)
    with torch.no_grad():
        model(**llava_batch(PROMPTS[:1]))
    assert get_drop_record(model).visual_tokens_per_layer[0].tolist() == tokens_per_layer(6, 64, config_)
    assert tokens_per_layer(6, 64, config_) == [64, 64, 22, 22, 6, 6]


@pytest.mark.parametrize("recycle", [True, False])
def test_the_release_schedule(recycle):
    """`sparsevlm(b)` keeps the release's table for 576 tokens after layers 2, 6 and 15 (0-based)."""
    for budget, counts in [(192, [300, 200, 110]), (128, [303, 110, 36]), (64, [66, 30, 17])]:
        scheduled = PyramidDropConfig.sparsevlm(budget, recycle=recycle)
        assert scheduled.method == ("sparsevlm" if recycle else "sparsevlm-norecycle")
        assert scheduled.layer_list == [3, 7, 16]
        assert [math.floor(576 * ratio) for ratio in scheduled.image_token_ratio_list] == counts
    with pytest.raises(ValueError, match=r"retained_tokens in \[64, 128, 192\], got 100"):
        PyramidDropConfig.sparsevlm(100, recycle=recycle)


def test_differs_from_pdrop_and_from_no_recycling():
    """Raters in the layer before each drop keep other tokens than PyramidDrop's last token in the next layer, and
    recycling changes what the later drops keep."""
    batch = llava_batch(PROMPTS, seed=0)
    kept = {}
    for method in (*METHODS, "pdrop"):
        model = apply_pyramid_drop(tiny("sdpa", 0), PyramidDropConfig([2, 4], [0.4, 0.1], method=method))
        with torch.no_grad():
            model(**batch)
        kept[method] = get_drop_record(model).kept_visual_indices
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(kept[METHOD], kept["pdrop"]))
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(kept[METHOD], kept["sparsevlm"]))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", METHODS)
def test_padded_generate_equals_each_row_alone(method, attn):
    """generate() on a padded batch with a text-only row: each row's tokens, logits and kept sets as alone."""
    batch = llava_batch([(3, 1, 6), (3, 0, 2), (1, 1, 4), (5, 1, 3)], seed=1)
    model = apply_pyramid_drop(tiny_llava(attn, kv_heads=2, text_only_output=True), config([1, 3], [20, 5], method))
    assert_rows_equal_alone(model, batch, [sample(batch, row) for row in range(4)], steps=4, tol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_a_full_recompute(method, attn):
    """Cached decoding (each stage continues its own compact numbering, as the release's per-layer cache length does)
    equals one forward over prompt + generated tokens, ranked with the prompt alone."""
    batch = llava_batch(PROMPTS, seed=2)
    model = apply_pyramid_drop(tiny_llava(attn, kv_heads=2, text_only_output=True), config([1, 3], [20, 5], method))
    assert_generate_equals_ranked_recompute(model, batch, steps=5, tol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(layer_list=[0, 2], image_token_ratio_list=[0.5, 0.25]), "layer_list entries must be >= 1"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5], position_mode="original"), "position_mode='compact'"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5], conversation="rerank"), "conversation='keep'"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5], video_pool="frame"), "video_pool='sample'"),
        (dict(layer_list=[2], image_token_ratio_list=[0.5], query="instruction_mean"), "leave query='last'"),
    ],
)
def test_refuses_what_the_release_does_not_do(method, fields, message):
    with pytest.raises(ValueError, match=f"method '{method}' .*{message}"):
        PyramidDropConfig(method=method, **fields)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "prompt,message",
    [
        ((3, 2, 4), r"one image per sample.*sample 0 has 128 droppable visual tokens spread over 130 positions"),
        ((3, 1, -2), r"sample 0 has 0 text tokens after its image and none is"),
    ],
)
def test_refuses_samples_the_release_cannot_rank(method, prompt, message):
    batch = llava_batch([prompt if prompt[2] >= 0 else (prompt[0], prompt[1], 0)])
    if prompt[2] < 0:  # the image ends the prompt
        keep = batch["input_ids"].shape[1] - 2
        batch = dict(batch, input_ids=batch["input_ids"][:, :keep], attention_mask=batch["attention_mask"][:, :keep])
    model = apply_pyramid_drop(tiny("sdpa", 0), config([1], [20], method))
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**batch)


@pytest.mark.parametrize("method", METHODS)
def test_m_rope_models_are_refused(method):
    """Qwen2-VL's M-RoPE positions have no compact renumbering, which SparseVLM's release does after every drop."""
    with pytest.raises(ValueError, match="position_mode='compact' is not valid for Qwen2-VL"):
        apply_pyramid_drop(tiny_qwen2_vl(), config([1], [20], method))
