"""`dycoke-ttm`: DyCoke's temporal token merging (TTM) as released, before the language model. Not all of DyCoke.

Source: KD-TAO/DyCoke at dd746349 (2025-11-22), `dycole_ttm` in `llava/model/llava_arch.py` (called on each video's
pooled frame features, LLaVA-OneVision, before the video's one newline token), with the defaults its lmms-eval
wrapper passes (`dycoke_k=0.7`; `merging_ratio = 1 - k` of each pruned frame survives). On a video of F frames of
T tokens each the release:
- phase 1, pairs (i, i+1) for even i < F-1: frame i+1 keeps the `int((1-k) T)` tokens least cosine-similar (of
  L2-normalised features) to the same token of frame i; frame i stays whole;
- phase 2, windows of 4 starting at i in `range(0, F-4, 4)`: frame i+2 keeps the `int((1-k) T)` tokens least
  cosine-similar to the same token of frame i (unnormalised features: the same cosine up to rounding);
- so: frames 0, 4, 8, ... stay whole; so does frame i+2 of a window the `range` leaves out (the last one when F is
  a multiple of 4, and the window of frame F-2 or F-3); with F odd, the last frame is not in the output at all
  (phase 1 stops at F-1). F <= 4 fails in the release (`torch.stack` of no comparison) and is refused here.

What the engine keeps here is exactly that set of tokens, per video frame (`video_pool="frame"`); images keep all.
The language model sees them as the release lays them out: a compared frame's kept tokens in `topk` order (least
similar first; `score_order=True`), with compact positions counting in that order (the release renumbers the merged
sequence). Left out: DyCoke's decode-time KV pruning (DP, `PrunableDynamicCache.dycoke_pruning`: at each decode step
layer `dycoke_l`'s attention re-selects `1 - dycoke_p` of the visual cache entries), which this prefill-time engine
cannot do. Ties between equal similarities go to the earlier token (the release's `topk` leaves them to the device).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramiddrop.scoring import RankInputs, register_scorer

DEFAULT_K = 0.7  # dycoke_k, the pruned share of a compared frame (lmms_eval/models/llava_onevision.py's default)


def _check(config) -> None:
    """Config-time refusals: each setting the release has no counterpart for."""
    refusals = (
        (
            config.layer_list != [0],
            "merges a video's frames once, before the language model, as its release does: use layer_list=[0], "
            f"image_token_ratio_list=[1 - k] (PyramidDropConfig.dycoke_ttm(k={DEFAULT_K})); got layer_list="
            f"{config.layer_list}. DyCoke's in-LLM part (decode-time KV pruning) is not implemented.",
        ),
        (
            config.video_pool != "frame",
            "keeps a number of tokens per video frame set by the frame's place in its window of 4; use "
            "video_pool='frame'.",
        ),
        (config.conversation != "keep", "merges frames once, when the video is encoded; use conversation='keep'."),
        (config.query != "last", "compares frames with each other and reads no query; leave query='last'."),
    )
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"method 'dycoke-ttm' {reason}")


@dataclass
class FramePlan:
    """What the release does with each video frame (frame ids as the engine numbers them, unique in the batch)."""

    start: dict[int, tuple[int, int]] = field(default_factory=dict)  # frame -> (row, first slot)
    size: dict[int, int] = field(default_factory=dict)
    compared: dict[int, tuple[int, bool]] = field(default_factory=dict)  # frame -> (reference frame, normalised)
    gone: set[int] = field(default_factory=set)  # the last frame of an odd count: not in the release's output


def frame_plan(frames: torch.Tensor) -> FramePlan:
    """The release's roles of the frames of every video; a video is a run of consecutive video tokens."""
    plan = FramePlan()
    for row, ids in enumerate(frames.tolist()):
        videos: list[list[int]] = []
        previous = -1
        for slot, frame in enumerate(ids):
            if frame >= 0 and frame not in plan.start:
                if previous < 0:
                    videos.append([])
                videos[-1].append(frame)
                plan.start[frame] = (row, slot)
            if frame >= 0:
                plan.size[frame] = plan.size.get(frame, 0) + 1
                if slot - plan.start[frame][1] >= plan.size[frame]:  # the engine's frames are runs; check it
                    raise ValueError(f"method 'dycoke-ttm': frame {frame} of sample {row} is not one run of tokens.")
            previous = frame
        for video in videos:
            _plan_video(plan, row, video)
    return plan


def _plan_video(plan: FramePlan, row: int, video: list[int]) -> None:
    count, sizes = len(video), {plan.size[frame] for frame in video}
    if count <= 4:
        raise ValueError(
            f"method 'dycoke-ttm' (as released) needs videos of at least 5 frames: its second phase compares frames i "
            f"and i+2 for i in range(0, F-4, 4) and fails when there is none. Sample {row} has a video of {count} "
            "frames (a frame as the model encodes it: Qwen2-VL's are temporal patches of 2 input frames); give it more "
            "frames or use another method."
        )
    if len(sizes) != 1:
        raise ValueError(
            f"method 'dycoke-ttm' compares frames token by token; sample {row} has frames of sizes {sizes}."
        )
    for index in range(1, count - count % 2, 2):  # phase 1: frame i+1 against frame i
        plan.compared[video[index]] = (video[index - 1], True)
    for index in range(0, count - 4, 4):  # phase 2: frame i+2 against frame i
        plan.compared[video[index + 2]] = (video[index], False)
    if count % 2:
        plan.gone.add(video[-1])


def _keep_counts(previous, groups, frames: torch.Tensor | None, keep_ratio: float) -> torch.Tensor:
    """Per ranking group: images and whole frames keep all, compared frames `int(T * (1 - k))`, a gone frame 0."""
    available = torch.bincount(previous.group_index[previous.pool], minlength=groups.size.numel())
    if frames is None:
        return available
    plan = frame_plan(frames)
    video = frames >= 0
    group_of = dict(zip(frames[video].tolist(), previous.group_index[video].tolist()))
    keep = available.clone()
    for frame in plan.compared:
        keep[group_of[frame]] = int(keep_ratio * plan.size[frame])
    for frame in plan.gone:
        keep[group_of[frame]] = 0
    return torch.minimum(keep, available)


@register_scorer("dycoke-ttm", check=_check, per_frame=True, keep_rule=_keep_counts, score_order=True)
def dycoke_ttm_scores(inputs: RankInputs) -> torch.Tensor:
    """Minus each compared token's cosine similarity to the same token of its reference frame (0 elsewhere): the
    top `int(T * (1 - k))` of a compared frame are the release's least similar tokens."""
    hidden = inputs.hidden_states
    if inputs.frame_index is None:
        return torch.zeros(hidden.shape[:2], device=hidden.device)
    plan = frame_plan(inputs.frame_index)
    reference = torch.full(hidden.shape[:2], -1, dtype=torch.long, device=hidden.device)
    normalised = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    for frame, (other, unit) in plan.compared.items():
        (row, start), size = plan.start[frame], plan.size[frame]
        reference[row, start : start + size] = torch.arange(size, device=hidden.device) + plan.start[other][1]
        normalised[row, start : start + size] = unit
    other = hidden.gather(1, reference.clamp(min=0)[..., None].expand_as(hidden))
    cosine = torch.nn.functional.cosine_similarity
    raw = cosine(hidden, other, dim=-1)
    unit = cosine(torch.nn.functional.normalize(hidden, p=2, dim=-1), torch.nn.functional.normalize(other, dim=-1), -1)
    similarity = torch.where(normalised, unit, raw).float()
    return torch.where(reference >= 0, -similarity, 0.0)
