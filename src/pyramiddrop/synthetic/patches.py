"""Stage 1 of the recipe: supervised per-patch pre-training of the vision tower (the part CLIP plays for LLaVA).

The LLaVA's own vision tower and projector, plus a linear head thrown away afterwards, predict for every patch the
shape, the colour and the (shape, colour) pair of the object covering most of it (or background), whether an
object's centre lies in it, and its 3x3 cell, row and column. Supervising every patch makes the visual tokens carry
object attributes and positions in minutes; nothing here refers to the language model or to dropping.
"""

from __future__ import annotations

import torch
from torch import nn

from pyramiddrop.synthetic.data import COLORS, GRID, IMAGE_SIZE, SHAPES, SPLIT_SEEDS, make_example, object_mask
from pyramiddrop.synthetic.model import PATCH_SIZE

# shape, colour and (shape, colour) pair (0: background), centre logit, 3x3 cell
HEADS = (1 + len(SHAPES), 1 + len(COLORS), 1 + len(SHAPES) * len(COLORS), 1, GRID * GRID)
MIN_COVER = 0.15  # a patch belongs to the object covering most of it, if that covers at least this fraction


def patch_owners(scene) -> torch.Tensor:
    """(patches,) index of the object covering most of each patch, or -1 (none covers `MIN_COVER` of it)."""
    mask = object_mask(scene)
    side = mask.width // PATCH_SIZE
    ids = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).long()
    ids = ids.view(side, PATCH_SIZE, side, PATCH_SIZE).permute(0, 2, 1, 3).reshape(side * side, -1)
    counts = nn.functional.one_hot(ids, len(scene.objects) + 1).sum(1)[:, 1:]  # (patches, objects)
    owners = torch.full((side * side,), -1)
    if scene.objects:
        best, owner = counts.max(1)
        keep = best >= MIN_COVER * PATCH_SIZE**2
        owners[keep] = owner[keep]
    return owners


def patch_cells(side: int = IMAGE_SIZE // PATCH_SIZE) -> torch.Tensor:
    """(patches,) the 3x3 grid cell each patch lies in (64 px cells hold exactly 4x4 patches)."""
    patch_row, patch_col = torch.arange(side * side).div(side, rounding_mode="floor"), torch.arange(side * side) % side
    per_cell = side // GRID
    return patch_row.div(per_cell, rounding_mode="floor") * GRID + patch_col.div(per_cell, rounding_mode="floor")


def patch_targets(scene) -> torch.Tensor:
    """(patches, 5): shape, colour, pair (0 background, else 1 + index), object-centre flag, cell."""
    owners = patch_owners(scene)
    side = IMAGE_SIZE // PATCH_SIZE
    targets = torch.zeros(side * side, 5, dtype=torch.long)
    targets[:, 4] = patch_cells(side)
    if scene.objects:
        keep = owners >= 0
        codes = [(SHAPES.index(o.shape), list(COLORS).index(o.color)) for o in scene.objects]
        lookup = torch.tensor([[1 + s, 1 + c, 1 + s * len(COLORS) + c] for s, c in codes])
        targets[keep, :3] = lookup[owners[keep]]
        for obj in scene.objects:
            targets[(obj.cy // PATCH_SIZE) * side + obj.cx // PATCH_SIZE, 3] = 1
    return targets


class PatchDataset(torch.utils.data.Dataset):
    """Pixels and per-patch targets of the training stream's scenes."""

    def __init__(self, image_processor, length: int, seed: int = SPLIT_SEEDS["train"]):
        self.image_processor, self.length, self.seed = image_processor, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:  # the stream is endless; the bound lets list() and for-loops stop
            raise IndexError(f"index {index} outside a dataset of {self.length} samples")
        example = make_example(self.seed, index)
        pixels = self.image_processor(example.image(), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "patch_labels": patch_targets(example.scene)}


class PatchPretrainer(nn.Module):
    """The vision tower (and with `projector` the projector, whose output the head then reads) with linear heads.

    Reading the projector's output makes the projector start VQA keeping the patches' positions: trained in VQA
    alone it keeps shape and colour and squashes the 3x3 cell to ~3 % of the object patches' variance.
    """

    def __init__(self, vision_tower: nn.Module, projector: nn.Module | None, hidden_size: int, row_col: bool = True):
        super().__init__()
        self.vision_tower, self.projector = vision_tower, projector
        self.head = nn.Linear(hidden_size, sum(HEADS))
        self.row_col_head = nn.Linear(hidden_size, 2 * GRID) if row_col else None

    def forward(self, pixel_values, patch_labels=None) -> dict:
        hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
        if self.projector is not None:
            hidden = self.projector(hidden)
        shape, color, pair, centre, cell = self.head(hidden).split(HEADS, dim=-1)
        out = {"logits": (shape, color, pair, centre[..., 0], cell)}
        if patch_labels is None:
            return out
        loss = sum(
            nn.functional.cross_entropy(logits.flatten(0, 1), patch_labels[..., column].flatten())
            for column, logits in ((0, shape), (1, color), (2, pair), (4, cell))
        )
        loss = loss + nn.functional.binary_cross_entropy_with_logits(centre[..., 0], patch_labels[..., 3].float())
        if self.row_col_head is not None:  # a cell = a row direction + a column direction: supervise both
            row, col = self.row_col_head(hidden).split(GRID, dim=-1)
            cells = patch_labels[..., 4].flatten()
            loss = loss + 2 * (
                nn.functional.cross_entropy(row.flatten(0, 1), cells // GRID)
                + nn.functional.cross_entropy(col.flatten(0, 1), cells % GRID)
            )
        out["loss"] = loss
        return out


@torch.no_grad()
def evaluate_patches(pretrainer: PatchPretrainer, image_processor, n: int = 100) -> dict:
    """Stage 1 quality on validation scenes: per-patch accuracies on object patches, background, centres, cells."""
    dataset = PatchDataset(image_processor, n, SPLIT_SEEDS["validation"])
    batch = [dataset[i] for i in range(n)]
    was_training = pretrainer.training
    shape, color, pair, centre, cell = pretrainer.eval()(torch.stack([b["pixel_values"] for b in batch]))["logits"]
    pretrainer.train(was_training)
    targets = torch.stack([b["patch_labels"] for b in batch])
    on_object, is_centre = targets[..., 0] > 0, targets[..., 3] > 0
    return {
        "object_patch_shape_accuracy": (shape.argmax(-1) == targets[..., 0])[on_object].float().mean().item(),
        "object_patch_color_accuracy": (color.argmax(-1) == targets[..., 1])[on_object].float().mean().item(),
        "object_patch_pair_accuracy": (pair.argmax(-1) == targets[..., 2])[on_object].float().mean().item(),
        "background_accuracy": (shape.argmax(-1) == 0)[~on_object].float().mean().item(),
        "centre_recall": (centre > 0)[is_centre].float().mean().item(),
        "centre_precision": is_centre[centre > 0].float().mean().item(),
        "cell_accuracy": (cell.argmax(-1) == targets[..., 4]).float().mean().item(),
    }
