"""`conditional-dpp`: CDPruner's conditional DPP (arXiv 2506.10967) with the instruction read from the language
model's input embeddings: a variant, not CDPruner.

CDPruner as released (Theia-4869/CDPruner, commit 9541616c, `LlavaMetaForCausalLM.encode_images` in
`llava/model/llava_arch.py`) scores each image token's relevance with CLIP's text tower: the question through
`CLIPTextModelWithProjection` against the patches through the tower's `post_layernorm` and `visual_projection`.
Hugging Face LLaVA checkpoints carry neither, so `method="cdpruner"` is refused (`methods.REFUSED`). This method
keeps every other step of the release and replaces only those two embeddings:
- similarity: cosine of the projected visual tokens (the language model's input, as in the release);
- relevance: minus the cosine of each visual token's input embedding with each instruction token's input
  embedding, averaged over the instruction (the release: over its text embeddings), then `(r - min + 1e-6) /
  (max - min)` over the group (the release: over the call's images); the release's optional theta is commented
  out there and absent here;
- kernel `r_i * S_ij * r_j` and the release's fast greedy MAP inference (no epsilon, one pick per step).

The instruction is the prompt after the last visual token (`query="instruction_mean"`'s rows; the release: the
question alone, without the chat template's tail; in training with labels, the engine's query rows: the token
before each answer); a sample without one keeps all its visual tokens, as the engine does for every sample without
query rows. A sample's images form one group (the release: each image keeps its own count). Where the largest
residual left is not positive (duplicates, or more tokens kept than the kernel's rank, as far as rounding lets it
reach 0), the release divides by the square root of zero or a negative number; here the picks stop and the rest
follow in sequence order.
"""

from __future__ import annotations

import torch

from pyramiddrop.scoring import RankInputs, register_scorer, within_group_index
from pyramiddrop.scoring.vispruner import check_pre_llm_release


def _check(config) -> None:
    check_pre_llm_release(config, "conditional-dpp", "CDPruner's release")
    if config.query != "instruction_mean":
        raise ValueError(
            "method 'conditional-dpp' conditions on the instruction (every prompt token after the image), the rows "
            "of query='instruction_mean'; pass query='instruction_mean'."
        )


def instruction_relevance(inputs: RankInputs) -> torch.Tensor:
    """Minus the mean cosine of each token's embedding with its row's instruction tokens ([B, L], raw)."""
    normalized = inputs.hidden_states.float()
    normalized = normalized / normalized.norm(dim=-1, keepdim=True)
    instruction = inputs.query_mask & inputs.attention_mask  # none: the engine keeps the sample's every token
    cosine = torch.einsum("bld,btd->blt", normalized, normalized)
    return -(cosine * instruction[:, None]).sum(-1) / instruction.sum(-1, keepdim=True).clamp(min=1)


def greedy_map_order(kernel: torch.Tensor, valid: torch.Tensor, steps: int) -> torch.Tensor:
    """The step at which the release's fast greedy MAP inference picks each item ([G, M]; `steps` if never).

    `kernel`: [G, M, M]; `valid`: [G, M]. A group stops when its largest residual is not positive.
    """
    groups, width = valid.shape
    index = torch.arange(groups, device=kernel.device)
    residual = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~valid, float("-inf"))
    directions = kernel.new_zeros(steps, groups, width)
    order = torch.full((groups, width), steps, dtype=torch.long, device=kernel.device)
    for step in range(steps):
        pick = residual.argmax(dim=-1)
        value = residual[index, pick]
        live = value > 0
        projection = torch.einsum("tg,tgm->gm", directions[:step, index, pick], directions[:step])
        direction = (kernel[index, pick] - projection) / value.clamp(min=1e-30).sqrt()[:, None]
        direction = torch.where(live[:, None], direction, 0.0)
        directions[step] = direction
        residual = residual - direction.square()
        residual[index, pick] = torch.where(live, float("-inf"), residual[index, pick])
        order[index, pick] = torch.where(live, step, order[index, pick])
    return order


@register_scorer("conditional-dpp", check=_check)
def conditional_dpp_scores(inputs: RankInputs) -> torch.Tensor:
    """Scores falling with the greedy's pick order, so each group's top `keep[g]` are its first picks; tokens never
    picked follow in sequence order."""
    within, size = within_group_index(inputs)
    visual = within >= 0
    groups, width = int(size.numel()), int(size.max()) if size.numel() else 0
    scores = torch.zeros(within.shape, dtype=torch.float32, device=within.device)
    if groups == 0:
        return scores
    place = (inputs.group_index[visual], within[visual])
    features = inputs.hidden_states.float()
    normalized = features.new_zeros(groups, width, features.shape[-1])
    normalized[place] = features[visual] / features[visual].norm(dim=-1, keepdim=True)
    relevance = features.new_zeros(groups, width)
    relevance[place] = instruction_relevance(inputs)[visual]
    valid = torch.arange(width, device=size.device)[None] < size[:, None]
    low = relevance.masked_fill(~valid, float("inf")).min(dim=-1, keepdim=True).values
    high = relevance.masked_fill(~valid, float("-inf")).max(dim=-1, keepdim=True).values
    relevance = torch.where(valid, (relevance - low + 1e-6) / (high - low), 0.0)
    kernel = relevance[:, :, None] * (normalized @ normalized.transpose(1, 2)) * relevance[:, None, :]
    steps = int(inputs.keep.max())
    picked = greedy_map_order(kernel, valid, steps)[place]
    scores[visual] = torch.where(picked < steps, 2.0 * width - picked, width - within[visual]).float()
    return scores
