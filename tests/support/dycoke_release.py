"""The oracle of `method="dycoke-ttm"`: DyCoke's temporal token merging as released, transcribed plainly.

Transcribed: `dycole_ttm` from `llava/model/llava_arch.py` at KD-TAO/DyCoke dd746349 (2025-11-22), which the
release calls on one video's pooled frame features (`image_feature`, frames back to back, before the video's
newline) with `num_tokens_per_frame` = the model's tokens per frame and `merging_ratio = dycoke_k`. It returns
features; the kept tokens are read back as the input rows the output rows are (random features: all distinct).
Used by tests/methods/test_dycoke.py and tests/processors/test_dycoke_processors.py.
"""

import torch
from tiny_models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID


def dycole_ttm(image_feature, num_tokens_per_frame=196, merging_ratio=0.7):
    """The release's function, line for line (`torch.tensor(similarity)` as the copy it makes, without the warning)."""
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio
    similarities = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame : (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame : (i + 2) * num_tokens_per_frame]
        frame1_norm = torch.nn.functional.normalize(frame1_tokens, p=2, dim=1)
        frame2_norm = torch.nn.functional.normalize(frame2_tokens, p=2, dim=1)
        similarity = torch.nn.functional.cosine_similarity(frame1_norm, frame2_norm, dim=1)
        similarities.append(similarity)
    similarities = torch.stack([similarity.clone().detach() for similarity in similarities])
    modified_image_feature = []
    for i in range(0, num_frames - 1, 2):
        frame1_tokens = image_feature[i * num_tokens_per_frame : (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame : (i + 2) * num_tokens_per_frame]
        avg_similarity = similarities[i // 2]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature.append(frame1_tokens)
        modified_image_feature.append(frame2_tokens[tokens_to_keep])
    odd_similarities = []
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame : (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame : (i + 3) * num_tokens_per_frame]
        similarity = torch.nn.functional.cosine_similarity(frame1_tokens, frame2_tokens, dim=1)
        odd_similarities.append(similarity)
    odd_similarities = torch.stack([similarity.clone().detach() for similarity in odd_similarities])
    for i in range(0, num_frames - 4, 4):
        frame1_tokens = image_feature[i * num_tokens_per_frame : (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame : (i + 3) * num_tokens_per_frame]
        avg_similarity = odd_similarities[i // 4]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature[i] = frame1_tokens
        modified_image_feature[i + 2] = frame2_tokens[tokens_to_keep]
    combined_tokens = torch.cat(modified_image_feature, dim=0)
    return combined_tokens


def released_kept(features: torch.Tensor, per_frame: int, k: float) -> list[int]:
    """The rows of `features` (one video, frames back to back) the release keeps, in the order it outputs them."""
    with torch.no_grad():
        out = dycole_ttm(features, per_frame, k)
    match = (out[:, None, :] == features[None]).all(-1)
    assert bool((match.sum(1) == 1).all())  # every output row is exactly one input row
    return match.float().argmax(1).tolist()


def llm_inputs(model, single: dict) -> torch.Tensor:
    """The embeddings the language model gets for one sample, from the model without any drop."""
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"][0].detach()

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**single)
    handle.remove()
    return captured["embeds"]


def oracle(model, single: dict, per_frame: int, k: float, newline: bool) -> set[int]:
    """The release's kept tokens of the sample's one video, as indices among its droppable visual tokens (the image
    tokens before the video, which the release never touches, all kept)."""
    embeds, ids = llm_inputs(model, single), single["input_ids"][0]
    video = (ids == VIDEO_TOKEN_ID).nonzero().flatten()
    if newline:  # OneVision's one newline after the video is layout, not a frame token
        video = video[:-1]
    num_images = int((ids == IMAGE_TOKEN_ID).sum())
    return set(range(num_images)) | {num_images + i for i in released_kept(embeds[video], per_frame, k)}
