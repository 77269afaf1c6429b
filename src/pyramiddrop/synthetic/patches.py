"""Stage 1 of the recipe: supervised per-patch pre-training of the vision tower (the part CLIP plays for LLaVA).

The LLaVA's own vision tower and projector, plus a linear head thrown away afterwards, predict for every patch the
shape, the colour and the (shape, colour) pair of the object covering most of it (or background), whether an
object's centre lies in it, and its 3x3 cell, row and column. Supervising every patch makes the visual tokens carry
object attributes and positions in minutes; nothing here refers to the language model or to dropping.

On cluttered scenes every patch also predicts the digit whose glyph it holds and, off the objects, the material (hue
and texture) of the background region at its centre; and the tower's CLS token (its pooled output, as CLIP's)
predicts which (shape, colour) pairs the scene holds, so that the CLS token means something and VisionZip's
premise (CLS attention marks the informative patches) can hold.
"""

from __future__ import annotations

import torch
from torch import nn

from pyramiddrop.synthetic.data import DEFAULT_SCENES, SPLIT_SEEDS, make_example
from pyramiddrop.synthetic.model import PATCH_SIZE
from pyramiddrop.synthetic.scene import (
    COLORS,
    DIGITS,
    HUES,
    SHAPES,
    TEXTURES,
    SceneSet,
    object_mask,
    region_index,
    scene_set,
)

PAIRS = len(SHAPES) * len(COLORS)
MATERIALS = len(HUES) * len(TEXTURES)


def heads(spec: SceneSet) -> tuple[int, ...]:
    """Logits per patch: shape, colour and pair (0: background), centre, cell; cluttered: digit, material."""
    sizes = (1 + len(SHAPES), 1 + len(COLORS), 1 + PAIRS, 1, spec.grid * spec.grid)
    return sizes + (len(DIGITS), MATERIALS) if spec.cluttered else sizes


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


def patch_cells(side: int, grid: int) -> torch.Tensor:
    """(patches,) the grid cell each patch lies in (64 px cells hold exactly 4x4 patches)."""
    patch_row, patch_col = torch.arange(side * side).div(side, rounding_mode="floor"), torch.arange(side * side) % side
    per_cell = side // grid
    return patch_row.div(per_cell, rounding_mode="floor") * grid + patch_col.div(per_cell, rounding_mode="floor")


def patch_targets(scene) -> torch.Tensor:
    """(patches, 5; cluttered: 7): shape, colour, pair (0 background, else 1 + index), object-centre flag, cell; cluttered scenes
    add the digit and the background material, -100 (not scored) where there is none: digits are scored on glyph
    patches only (about one patch in 60 holds one; a loss over every patch, mostly "no digit", left 68 % of glyphs
    read after stage 1), materials off the objects."""
    spec = scene_set(scene.scenes)
    owners = patch_owners(scene)
    side = spec.image_size // PATCH_SIZE
    targets = torch.zeros(side * side, 7 if spec.cluttered else 5, dtype=torch.long)
    targets[:, 4] = patch_cells(side, spec.grid)
    keep = owners >= 0
    if scene.objects:
        codes = [(SHAPES.index(o.shape), list(COLORS).index(o.color)) for o in scene.objects]
        lookup = torch.tensor([[1 + s, 1 + c, 1 + s * len(COLORS) + c] for s, c in codes])
        targets[keep, :3] = lookup[owners[keep]]
        for obj in scene.objects:
            targets[(obj.cy // PATCH_SIZE) * side + obj.cx // PATCH_SIZE, 3] = 1
    if spec.cluttered:
        targets[:, 5] = -100
        for obj in scene.objects:
            row, col = obj.glyph_patch
            targets[row * side + col, 5] = obj.digit
        centres = torch.arange(side) * PATCH_SIZE + PATCH_SIZE // 2
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        owner_region = region_index(scene, xs.flatten().numpy(), ys.flatten().numpy())
        materials = torch.tensor([scene.regions[i].material for i in owner_region])
        targets[:, 6] = torch.where(keep, -100, materials)
    return targets


def scene_pairs(scene) -> torch.Tensor:
    """(18,) 1.0 for each (shape, colour) pair the scene holds: what the CLS token learns to predict."""
    present = torch.zeros(PAIRS)
    for obj in scene.objects:
        present[SHAPES.index(obj.shape) * len(COLORS) + list(COLORS).index(obj.color)] = 1
    return present


class PatchDataset(torch.utils.data.Dataset):
    """Pixels and per-patch targets of the training stream's scenes."""

    def __init__(self, image_processor, length: int, seed: int = SPLIT_SEEDS["train"], scenes: str = DEFAULT_SCENES):
        self.image_processor, self.length, self.seed, self.scenes = image_processor, length, seed, scenes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:  # the stream is endless; the bound lets list() and for-loops stop
            raise IndexError(f"index {index} outside a dataset of {self.length} samples")
        example = make_example(self.seed, index, scenes=self.scenes)
        pixels = self.image_processor(example.image(), return_tensors="pt")["pixel_values"][0]
        sample = {"pixel_values": pixels, "patch_labels": patch_targets(example.scene)}
        if scene_set(self.scenes).cluttered:
            sample["scene_pairs"] = scene_pairs(example.scene)
        return sample


class PatchPretrainer(nn.Module):
    """The vision tower (and with `projector` the projector, whose output the head then reads) with linear heads.

    Reading the projector's output makes the projector start VQA keeping the patches' positions: trained in VQA
    alone it keeps shape and colour and squashes the 3x3 cell to ~3 % of the object patches' variance.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module | None,
        hidden_size: int,
        row_col: bool = True,
        scenes: str = DEFAULT_SCENES,
    ):
        super().__init__()
        self.vision_tower, self.projector, self.spec = vision_tower, projector, scene_set(scenes)
        self.heads = heads(self.spec)
        self.head = nn.Linear(hidden_size, sum(self.heads))
        self.row_col_head = nn.Linear(hidden_size, 2 * self.spec.grid) if row_col else None
        tower_width = vision_tower.config.hidden_size
        self.cls_head = nn.Linear(tower_width, PAIRS) if self.spec.cluttered else None

    def forward(self, pixel_values, patch_labels=None, scene_pairs=None) -> dict:
        tower = self.vision_tower(pixel_values=pixel_values)
        hidden = tower.last_hidden_state[:, 1:]  # drop CLS
        if self.projector is not None:
            hidden = self.projector(hidden)
        logits = self.head(hidden).split(self.heads, dim=-1)
        out = {"logits": logits}
        if self.cls_head is not None:
            out["cls_logits"] = self.cls_head(tower.pooler_output)
        if patch_labels is None:
            return out
        columns = (0, 1, 2, 4, 5, 6) if self.spec.cluttered else (0, 1, 2, 4)
        loss = sum(
            nn.functional.cross_entropy(
                logits[column].flatten(0, 1), patch_labels[..., column].flatten(), ignore_index=-100
            )
            for column in columns
        )
        loss = loss + nn.functional.binary_cross_entropy_with_logits(logits[3][..., 0], patch_labels[..., 3].float())
        if self.row_col_head is not None:  # a cell = a row direction + a column direction: supervise both
            grid = self.spec.grid
            row, col = self.row_col_head(hidden).split(grid, dim=-1)
            cells = patch_labels[..., 4].flatten()
            loss = loss + 2 * (
                nn.functional.cross_entropy(row.flatten(0, 1), cells // grid)
                + nn.functional.cross_entropy(col.flatten(0, 1), cells % grid)
            )
        if self.cls_head is not None and scene_pairs is not None:
            loss = loss + nn.functional.binary_cross_entropy_with_logits(out["cls_logits"], scene_pairs)
        out["loss"] = loss
        return out


@torch.no_grad()
def evaluate_patches(pretrainer: PatchPretrainer, image_processor, n: int = 100) -> dict:
    """Stage 1 quality on validation scenes: per-patch accuracies on object patches, background, centres, cells;
    on cluttered scenes also digits (on glyph patches), materials (on background patches) and the CLS scene set."""
    dataset = PatchDataset(image_processor, n, SPLIT_SEEDS["validation"], pretrainer.spec.name)
    batch = [dataset[i] for i in range(n)]
    was_training = pretrainer.training
    out = pretrainer.eval()(torch.stack([b["pixel_values"] for b in batch]))
    pretrainer.train(was_training)
    shape, color, pair, centre, cell = out["logits"][:5]
    targets = torch.stack([b["patch_labels"] for b in batch])
    on_object, is_centre = targets[..., 0] > 0, targets[..., 3] > 0
    metrics = {
        "object_patch_shape_accuracy": (shape.argmax(-1) == targets[..., 0])[on_object].float().mean().item(),
        "object_patch_color_accuracy": (color.argmax(-1) == targets[..., 1])[on_object].float().mean().item(),
        "object_patch_pair_accuracy": (pair.argmax(-1) == targets[..., 2])[on_object].float().mean().item(),
        "background_accuracy": (shape.argmax(-1) == 0)[~on_object].float().mean().item(),
        "centre_recall": (centre[..., 0] > 0)[is_centre].float().mean().item(),
        "centre_precision": is_centre[centre[..., 0] > 0].float().mean().item(),
        "cell_accuracy": (cell.argmax(-1) == targets[..., 4]).float().mean().item(),
    }
    if pretrainer.spec.cluttered:
        digit, material = out["logits"][5:]
        has_glyph, off_object = targets[..., 5] >= 0, targets[..., 6] >= 0
        pairs = torch.stack([b["scene_pairs"] for b in batch])
        metrics |= {
            "glyph_digit_accuracy": (digit.argmax(-1) == targets[..., 5])[has_glyph].float().mean().item(),
            "background_material_accuracy": (material.argmax(-1) == targets[..., 6])[off_object].float().mean().item(),
            "cls_scene_set_exact": ((out["cls_logits"] > 0) == (pairs > 0)).all(-1).float().mean().item(),
        }
    return metrics
