"""What the language model's visual inputs carry: the projector's output on object patches of 150 validation scenes.

    .venv/bin/python benchmarks/synthetic_features.py MODEL_DIR [MODEL_DIR ...]

Per model: a linear probe's held-out accuracy for the patch's 3x3 cell, the share of the object patches' variance
that the class means of cell, shape and colour explain (how strongly each attribute is there, not only whether it
can be read), and the mean token norm. Used in docs/synthetic.md (issue 19).
"""

import sys

import torch

from pyramiddrop.synthetic.data import make_example
from pyramiddrop.synthetic.model import load
from pyramiddrop.synthetic.patches import patch_targets


@torch.no_grad()
def projected_patches(directory: str, scenes: int = 150) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches, width) projector outputs (CLS dropped, as the model does) and their stage 1 targets."""
    model, processor = load(directory)
    features, targets = [], []
    for index in range(scenes):
        example = make_example(1, index)
        pixels = processor.image_processor(example.image(), return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        features.append(model.model.multi_modal_projector(hidden)[0])
        targets.append(patch_targets(example.scene))
    return torch.cat(features), torch.cat(targets)


def variance_share(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class sum of squares over the total: 1 if the classes are all there is, 0 if they are invisible."""
    centred = features - features.mean(0)
    means = torch.zeros(int(labels.max()) + 1, features.shape[1]).index_add_(0, labels, centred)
    means /= torch.bincount(labels, minlength=len(means)).clamp_min(1)[:, None].float()
    return float((means[labels] ** 2).sum() / (centred**2).sum())


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy (last third) of a softmax regression on standardised features."""
    split = len(features) * 2 // 3
    features = (features - features[:split].mean(0)) / features[:split].std(0).clamp_min(1e-6)
    weight = torch.zeros(features.shape[1], int(labels.max()) + 1, requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(features[:split] @ weight, labels[:split]).backward()
        optimizer.step()
    return float(((features[split:] @ weight).argmax(1) == labels[split:]).float().mean())


if __name__ == "__main__":
    torch.manual_seed(0)
    for directory in sys.argv[1:]:
        features, targets = projected_patches(directory)
        on_object = targets[:, 0] > 0
        features, targets = features[on_object], targets[on_object]
        print(
            f"{directory}: object patches: cell probe {probe_accuracy(features, targets[:, 4]):.3f}, "
            f"variance share cell {variance_share(features, targets[:, 4]):.3f}, "
            f"shape {variance_share(features, targets[:, 0]):.3f}, colour {variance_share(features, targets[:, 1]):.3f}, "
            f"token norm {features.norm(dim=1).mean():.1f}"
        )
