"""`vscan`: VScan as released (Tencent/SelfEvolvingAgent `VScan/`, arXiv 2505.22654) for LLaVA-1.5.

The release (`LlavaMetaForCausalLM.encode_images`, `window_cls_selection`, `token_merging` in
`llava/model/llava_arch.py`; `LlamaModel.forward_x` and `layer_prune` in `llava/model/modeling_llama_x.py`,
commit 5fe6480) keeps `T` (`--visual_token_num`) of each image's tokens before the language model:
- local scan: the [CLS] attention (head mean) of vision layer 5 (`image_attentions[5]`), in 6 x 6 windows of the
  patch grid; each window keeps its top `int(T * 0.5) // windows` patches;
- global scan: the [CLS] attention of vision layer -2 (`image_attentions[-2]`: LLaVA-1.5's feature layer; -2 here
  too whatever `vision_feature_layer` is, as the release), the local picks set to 0, keeps its top `T - int(T * 0.5)`;
- merging: after the projector, every other token of the image joins its most cosine-similar kept token, which
  becomes the mean of itself and the tokens that joined it.
Then, inside the language model, at each layer of `--layer_list` (default 16, keeping 32 of the 96), PyramidDrop's
`layer_prune`: the last instruction token's attention in that layer, head mean, top-k (`pdrop` here).

Here that is `layer_list=[0, K, ...]` (`[0]` alone: the release without `--layer_list`): the drop before layer 0 is
the scans and the merge (`RankInputs.stage == 1`), later drops rank as `pdrop`. Positions are renumbered without
gaps at every drop, as in the release; training (labels) ranks with the tokens before the answers, as its
`layer_prune` does, and the merge carries the gradient. Differences:
- the release asserts a 24 x 24 grid (576 tokens, 4 x 4 windows); any square grid whose side is a multiple of 6
  works the same way here, others are refused;
- when `int(T * 0.5)` is not a multiple of the window count the release keeps fewer than `T` tokens (the windows'
  remainder is lost); here the engine keeps `T`, the rest taken by the global scan (its next tokens);
- a sample's `T` is the engine's count (`int(N * ratio)`), split evenly over its images (the release gives each
  image `T`); a sample with several images ranks them together in the language model (the release's `layer_prune`
  reads the first image's position only);
- attention and cosine similarity are computed in float32 (the release: the model's dtype);
- refused, not approximated: other families (no per-patch tower attention: LLaVA-NeXT's anyres crops, Qwen2.5-VL's
  windowed tower, both in the release), towers without a layer 5, grids that are not multiples of 6, beam search
  (generate() repeats image features the tower scored once), other positions, queries and re-ranking turns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyramiddrop.scoring import RankInputs, register_scorer
from pyramiddrop.scoring.attention import attention_scores

LOCAL_LAYER, GLOBAL_LAYER = 5, -2  # image_attentions[5] (shallow) and image_attentions[-2] (deep)
WINDOW = 6  # window_cls_selection(..., window_size=6)
GLOBAL_RATIO = 0.5  # global_ratio; local_ratio = 1 - global_ratio


def _check(config) -> None:
    """Config-time refusals: what the release has no counterpart for."""
    refusals = (
        (
            config.layer_list[:1] != [0],
            "scans the vision encoder before the language model, then drops inside it: layer_list starts with 0 "
            "(the release's default keeps 96 then 32 of 576 after layer 16 of 32: layer_list=[0, 16], "
            f"image_token_ratio_list=[96.5 / 576, 32.5 / 576]); got layer_list={config.layer_list}.",
        ),
        (
            config.position_mode != "compact",
            "renumbers positions without gaps at every drop, as its release does; use position_mode='compact'.",
        ),
        (config.query != "last", "ranks with the last instruction token in the language model; leave query='last'."),
        (
            config.conversation != "keep",
            "merges tokens before the language model, which a new turn cannot redo; use conversation='keep'.",
        ),
    )
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"method 'vscan' {reason}")


def _images(inputs: RankInputs) -> list[tuple[int, int, torch.Tensor]]:
    """(group, row, slots) of every image in the pool, its slots in patch order; checks the grid."""
    patch = inputs.vision_scores[..., -1].round().long()
    images = []
    for group in range(inputs.keep.numel()):
        row, slots = (inputs.group_index == group).nonzero(as_tuple=True)
        if slots.numel() == 0:
            continue
        starts = (patch[row, slots] == 0).nonzero().flatten().tolist()
        for image_slots in torch.tensor_split(slots, starts[1:]):
            count, side = image_slots.numel(), math.isqrt(image_slots.numel())
            if (
                side * side != count
                or side % WINDOW
                or not torch.equal(patch[row[0], image_slots], torch.arange(count, device=patch.device))
            ):
                raise ValueError(
                    f"method 'vscan' scans each image's square patch grid in {WINDOW} x {WINDOW} windows (the "
                    f"release: 24 x 24): an image of {count} tokens is not a grid whose side is a multiple of "
                    f"{WINDOW}. Use LLaVA-1.5 (one token per patch) with such a vision tower."
                )
            images.append((group, int(row[0]), image_slots))
    return images


def released_set(local_attention: torch.Tensor, global_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The release's kept patches of one image ([side * side] bool) and the global scan's scores with the local
    picks at 0 (what ranks any further token)."""
    side = math.isqrt(local_attention.numel())
    windows = side // WINDOW
    per_window = int(keep * (1 - GLOBAL_RATIO)) // (windows * windows)
    kept = torch.zeros_like(local_attention, dtype=torch.bool)
    if per_window:
        blocks = local_attention.view(windows, WINDOW, windows, WINDOW).transpose(1, 2).reshape(windows**2, -1)
        top = blocks.topk(per_window, dim=1).indices  # [windows, per_window] inside each window, row-major
        window = torch.arange(windows**2, device=top.device)[:, None]
        row, column = (window // windows) * WINDOW + top // WINDOW, (window % windows) * WINDOW + top % WINDOW
        kept[(row * side + column).flatten()] = True
    global_scores = global_attention.masked_fill(kept, 0)
    kept[global_scores.topk(keep - int(keep * (1 - GLOBAL_RATIO))).indices] = True
    return kept, global_scores


def _encoder_scores(inputs: RankInputs) -> torch.Tensor:
    """The release's set of every image first (2 + its global score), then the rest by the global scan."""
    if inputs.vision_scores is None or inputs.vision_scores.dim() != 3:
        raise ValueError(
            "method 'vscan' scans the vision tower's attention, which this call did not compute: pass "
            "pixel_values in the prefill (not pre-encoded image features)."
        )
    local_attention, global_attention = inputs.vision_scores[..., 0], inputs.vision_scores[..., 1]
    scores = torch.zeros_like(local_attention)
    images = _images(inputs)
    per_group = torch.bincount(
        torch.tensor([group for group, _, _ in images], dtype=torch.long), minlength=len(inputs.keep)
    )
    for group, row, slots in images:
        keep = min(int(inputs.keep[group]) // int(per_group[group]), slots.numel())
        kept, global_scores = released_set(local_attention[row, slots], global_attention[row, slots], keep)
        scores[row, slots] = global_scores + 2 * kept
    return scores


def vscan_merge(inputs: RankInputs, selected: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Before the language model: each dropped token of an image joins its most cosine-similar kept token of that
    image, which becomes their mean (with gradient). Later drops do not merge."""
    if inputs.stage != 1:
        return hidden
    merged = hidden.clone()
    for _, row, slots in _images(inputs):
        kept = selected[row, slots]
        if bool(kept.all()) or not bool(kept.any()):
            continue
        features = hidden[row, slots]
        retained, others = features[kept], features[~kept]
        similarity = F.normalize(others.float(), dim=-1) @ F.normalize(retained.float(), dim=-1).T
        nearest = similarity.argmax(dim=1)  # the first kept token (in patch order) on a tie, as the release
        sums = retained.index_add(0, nearest, others)
        counts = 1 + torch.bincount(nearest, minlength=retained.shape[0])
        merged[row, slots[kept]] = sums / counts[:, None].to(hidden.dtype)
    return merged


@register_scorer("vscan", check=_check, merge=vscan_merge, vision_layers=(LOCAL_LAYER, GLOBAL_LAYER))
def vscan_scores(inputs: RankInputs) -> torch.Tensor:
    """The scans before the language model (the first drop, at layer 0); PyramidDrop's attention after."""
    if inputs.stage == 1:
        return _encoder_scores(inputs)
    return attention_scores(inputs)
