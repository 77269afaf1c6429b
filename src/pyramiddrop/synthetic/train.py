"""Train the tiny LLaVA from scratch on CPU, in two stages, with the Hugging Face Trainer.

1. Vision pre-training: the CLIP tower and the projector plus a linear head predict, for every patch, the shape
   and the colour of the object under it (or background), whether the object's centre falls in it, and its grid
   row and column. Supervising each patch makes the visual tokens carry object attributes in minutes.
2. VQA: the whole LLaVA (vision tower frozen by default) learns to answer 8 questions per image, with the loss
   on the answer tokens only, in curriculum phases (`--curriculum`; one Trainer per phase, so each phase starts
   with a fresh optimizer state; the last phase decays the learning rate with a cosine). The referent loss
   makes the last word of each phrase that names an object ("the red circle") know that object before layer 2;
   the last `--augment-drop-steps` steps drop visual tokens at random on PyramidDrop's schedule.

    python -m pyramiddrop.synthetic.train --out runs/synthetic --threads 2  # the embedded model's recipe
    python -m pyramiddrop.synthetic.train --out /tmp/smoke --quick        # a smoke test, under a minute

Images are rendered on the fly from `(seed, index)`, so nothing big is stored. The output directory gets the
model and processor (loadable with the Auto classes), `loss_curve.csv` and `metrics.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, is_pyramid_drop_applied, remove_pyramid_drop
from pyramiddrop.evaluate import noise_visual_tokens
from pyramiddrop.scoring import SCORERS
from pyramiddrop.synthetic.data import (
    CELL_NAMES,
    COLORS,
    COUNT_WORDS,
    GRID,
    IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPES,
    SPLIT_SEEDS,
    accuracy_by_type,
    build_prompt,
    chance_accuracy,
    extra_questions,
    make_example,
    make_split,
    object_mask,
    parse_question,
    referenced_objects,
)
from pyramiddrop.synthetic.model import (
    PATCH_SIZE,
    build_model,
    directory_size_mb,
    load,
    predict,
    save,
    set_rope_theta,
)

# shape or background, colour or background, centre logit, the 3x3 cell the patch lies in (64 px cells hold
# exactly 4x4 patches, so every patch lies in one cell; supervising it keeps positions in the visual tokens)
HEADS = (1 + len(SHAPES), 1 + len(COLORS), 1, GRID * GRID)
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
    """(patches, 4) targets: shape (0 background, else 1 + index), colour (likewise), object-centre flag, cell."""
    owners = patch_owners(scene)
    side = IMAGE_SIZE // PATCH_SIZE
    targets = torch.zeros(side * side, 4, dtype=torch.long)
    targets[:, 3] = patch_cells(side)
    if scene.objects:
        keep = owners >= 0
        lookup = torch.tensor([[1 + SHAPES.index(o.shape), 1 + list(COLORS).index(o.color)] for o in scene.objects])
        targets[keep, :2] = lookup[owners[keep]]
        for obj in scene.objects:
            targets[(obj.cy // PATCH_SIZE) * side + obj.cx // PATCH_SIZE, 2] = 1
    return targets


def focus_patches(scene, question: str, owners: torch.Tensor) -> torch.Tensor:
    """(patches,) bool: where the answer to `question` is in the image (for `--focus-weight`).

    The patches of the objects the question names; for "what shape is in the {cell}?" with nothing there, the
    cell's patches (empty for an absent object of an exists question, whose answer is nowhere).
    """
    query = parse_question(question)
    objects = referenced_objects(scene, query)
    if query["type"] == "location" and not objects:
        return patch_cells() == [name for row in CELL_NAMES for name in row].index(query["cell"])
    return torch.isin(owners, torch.tensor(objects, dtype=torch.long))


# what the referent loss predicts about the object a phrase names: present, row, column, shape, colour, and for
# the kind a count question names, how many
REFERENT_HEADS = (2, GRID, GRID, len(SHAPES), len(COLORS), len(COUNT_WORDS))
# where a referent record is read: at the phrase's last word, or at the answer's last prompt token about the
# question's first or second phrase (the targets' column 0)
REFERENT_PLACES = ("word", "answer1", "answer2")


def referent_heads(width: int, word_layers: list[int], answer_layers: list[int]) -> nn.ModuleDict:
    """One linear head per (place, layer), on the normalised hidden state: the residual stream's scale grows with
    depth, and a raw linear head started at a loss of 20."""
    places = [("word", layer) for layer in word_layers]
    places += [(place, layer) for place in REFERENT_PLACES[1:] for layer in answer_layers]
    return nn.ModuleDict(
        {
            f"{place}:{layer}": nn.Sequential(
                nn.LayerNorm(width, elementwise_affine=False), nn.Linear(width, sum(REFERENT_HEADS))
            )
            for place, layer in places
        }
    )


def referent_targets(scene, question: str, question_tokens: int, count: bool = True) -> list[tuple[int, list[int]]]:
    """(token index in the question, targets) for each phrase of `question` that names one object, at its last
    word: the shape of "the red circle", the cell word of "the top left", the plural of "how many circles".
    Targets follow `REFERENT_HEADS`; -100 where there is nothing to say (no object, or no count). `count=False`
    leaves count questions out (as the first runs with this loss did).
    """
    query = parse_question(question)
    last_word = question_tokens - 2  # the word before "?"
    unknown = [-100] * (len(REFERENT_HEADS) - 1)
    if query["type"] == "count":  # "how many {shapes} are there?": the count at the plural, before any drop
        how_many = len(referenced_objects(scene, query))
        return [(2, [int(how_many > 0), *unknown[:-1], how_many])] if count else []
    if query["type"] == "spatial":
        second = {"type": "exists", "shape": query["other_shape"], "color": query["other_color"]}
        phrases = [(3, query | {"type": "exists"}), (last_word, second)]  # "is the {c1} {s1} ..."
    else:
        phrases = [(last_word, query)]
    out = []
    for position, phrase in phrases:
        found = referenced_objects(scene, phrase)
        if found:
            obj = scene.objects[found[0]]
            attributes = [obj.row, obj.col, SHAPES.index(obj.shape), list(COLORS).index(obj.color)]
            out.append((position, [1, *attributes, -100]))
        else:
            out.append((position, [0, *unknown]))
    return out


class PatchDataset(torch.utils.data.Dataset):
    """Stage 1 samples: pixels and per-patch targets of the training stream's scenes."""

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
    """The LLaVA's own vision tower (and with `--align-projector` its projector) with a linear per-patch head; the
    head is thrown away afterwards.

    Reading the projector's output (`--align-projector`, the default) makes the projector start VQA keeping the
    patches' position: trained in VQA alone it keeps shape and colour and squashes the 3x3 cell to ~3 % of the
    object patches' variance (26-29 % at the tower's output).
    """

    def __init__(self, vision_tower: nn.Module, projector: nn.Module | None, hidden_size: int, row_col: bool = False):
        super().__init__()
        self.vision_tower, self.projector = vision_tower, projector
        self.head = nn.Linear(hidden_size, sum(HEADS))
        self.row_col_head = nn.Linear(hidden_size, 2 * GRID) if row_col else None

    def forward(self, pixel_values, patch_labels=None) -> dict:
        hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
        if self.projector is not None:
            hidden = self.projector(hidden)
        shape, color, centre, cell = self.head(hidden).split(HEADS, dim=-1)
        out = {"logits": (shape, color, centre[..., 0], cell)}
        if patch_labels is not None:
            loss = nn.functional.cross_entropy(shape.flatten(0, 1), patch_labels[..., 0].flatten())
            loss = loss + nn.functional.cross_entropy(color.flatten(0, 1), patch_labels[..., 1].flatten())
            centre_loss = nn.functional.binary_cross_entropy_with_logits(centre[..., 0], patch_labels[..., 2].float())
            cell_loss = nn.functional.cross_entropy(cell.flatten(0, 1), patch_labels[..., 3].flatten())
            out["loss"] = loss + centre_loss + cell_loss
            if self.row_col_head is not None:  # a cell = a row direction + a column direction, as its two words
                row, col = self.row_col_head(hidden).split(GRID, dim=-1)
                cells = patch_labels[..., 3].flatten()
                row_loss = nn.functional.cross_entropy(row.flatten(0, 1), cells // GRID)
                out["loss"] = out["loss"] + 2 * (
                    row_loss + nn.functional.cross_entropy(col.flatten(0, 1), cells % GRID)
                )
        return out


class VQADataset(torch.utils.data.Dataset):
    """Stage 2 samples: prompt + answer + </s> (+ more turns), labels -100 everywhere but answers and </s>.

    With `turns` > 1 the sequence continues "USER: q2 ASSISTANT: a2</s>..." about the same image, which
    buys several answers for one pass over the visual tokens (the chat template's multi-turn format).
    """

    def __init__(
        self,
        processor,
        length: int,
        seed: int = SPLIT_SEEDS["train"],
        turns: int = 1,
        start: int = 0,
        scene_objects: tuple[int, int] = (3, 6),
        question_type: str | None = None,
        focus: bool = False,
        referents: bool = False,
        referent_count: bool = True,
    ):
        self.processor, self.length, self.seed, self.turns, self.start = processor, length, seed, turns, start
        self.scene_objects, self.question_type, self.focus = scene_objects, question_type, focus
        self.referents, self.referent_count = referents, referent_count

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:  # the stream is endless; the bound lets list() and for-loops stop
            raise IndexError(f"index {index} outside a dataset of {self.length} samples")
        index += self.start
        if self.question_type is not None:  # types cycle with the index: keep every 5th, answers stay balanced
            index = index * len(QUESTION_TYPES) + QUESTION_TYPES.index(self.question_type)
        example = make_example(self.seed, index, self.scene_objects)
        inputs = self.processor(images=example.image(), text=build_prompt(example.question), return_tensors="pt")
        prompt = inputs["input_ids"][0].tolist()
        tokenizer = self.processor.tokenizer
        input_ids, labels = list(prompt), [-100] * len(prompt)
        turns = 1 if self.question_type is not None else self.turns
        more = extra_questions(example.scene, self.seed, index, turns - 1)
        owners = patch_owners(example.scene) if self.focus else None
        answer_positions, focus_masks, referents = [], [], []
        for turn, (question, answer, _) in enumerate([(example.question, example.answer, example.type), *more]):
            if turn:
                ids = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
                input_ids, labels = input_ids + ids, labels + [-100] * len(ids)
            if self.referents:  # the question's tokens end before "assistant :"
                length = len(tokenizer(question, add_special_tokens=False)["input_ids"])
                first = len(input_ids) - 2 - length
                for number, (i, target) in enumerate(
                    referent_targets(example.scene, question, length, self.referent_count)
                ):
                    referents += [(first + i, [0, *target]), (len(input_ids) - 1, [1 + number, *target])]
            if self.focus:  # the last prompt token, whose output predicts the answer
                answer_positions.append(len(input_ids) - 1)
                focus_masks.append(focus_patches(example.scene, question, owners))
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            input_ids, labels = input_ids + ids, labels + ids
        sample = {"input_ids": input_ids, "labels": labels, "pixel_values": inputs["pixel_values"][0]}
        if self.focus:
            sample |= {"answer_positions": torch.tensor(answer_positions), "focus_masks": torch.stack(focus_masks)}
        if self.referents:
            sample["referent_positions"] = torch.tensor([p for p, _ in referents], dtype=torch.long)
            targets = torch.tensor([t for _, t in referents], dtype=torch.long)
            sample["referent_targets"] = targets.reshape(-1, 1 + len(REFERENT_HEADS))  # place, then targets
        return sample


def collate_vqa(pad_id: int):
    """Right padding, so the loss positions stay where the dataset put them."""

    def collate(samples: list[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), pad_id)
        labels = torch.full((len(samples), length), -100)
        attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.tensor(sample["input_ids"])
            labels[row, :n] = torch.tensor(sample["labels"])
            attention_mask[row, :n] = 1
        pixel_values = torch.stack([s["pixel_values"] for s in samples])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
        }
        if "focus_masks" in samples[0]:  # every sample of a phase has the same number of turns
            batch["answer_positions"] = torch.stack([s["answer_positions"] for s in samples])
            batch["focus_masks"] = torch.stack([s["focus_masks"] for s in samples])
        if "referent_positions" in samples[0]:  # phrases per sample vary: pad with position -1
            slots = max(1, max(len(s["referent_positions"]) for s in samples))
            batch["referent_positions"] = torch.full((len(samples), slots), -1)
            batch["referent_targets"] = torch.full((len(samples), slots, 1 + len(REFERENT_HEADS)), -100)
            for row, sample in enumerate(samples):
                n = len(sample["referent_positions"])
                batch["referent_positions"][row, :n] = sample["referent_positions"]
                batch["referent_targets"][row, :n] = sample["referent_targets"]
        return batch

    return collate


class GroundingTrainer(Trainer):
    """The answer loss plus optional training-only losses that say where an answer's evidence is.

    * `focus_weight` x the grounding loss: at `focus_layers`, the head-averaged attention of each answer's last
      prompt token over the visual tokens should fall on the patches its question is about. It focused the
      attention but did not raise accuracy (docs/synthetic.md).
    * `referent_weight` x the referent loss: the hidden state entering each of `referent_layers`, at the last word
      of each phrase that names one object ("the red circle", "the top left"), should tell through a linear head
      (`referent_heads`, thrown away after training) whether that object exists, and its row, column, shape and
      colour; with `answer_layers`, so should the answer's last prompt token, about each phrase of its question
      (a head for the first phrase, one for the second). Linear probes found none of this in the trained model's
      hidden states: the answer loss alone never taught it to look a two-word name up.
    """

    def __init__(
        self,
        *args,
        focus_weight: float = 0.0,
        focus_layers: list[int] = (),
        referent_weight: float = 0.0,
        referent_layers: list[int] = (),
        answer_layers: list[int] = (),
        referent_heads: nn.ModuleDict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.focus_weight, self.focus_layers = focus_weight, focus_layers
        self.referent_weight, self.referent_heads = referent_weight, referent_heads
        self.referent_layers = {"word": referent_layers} | {place: answer_layers for place in REFERENT_PLACES[1:]}
        self._losses: dict[str, list[float]] = {"focus_loss": [], "referent_loss": []}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.referent_heads is not None:  # the heads are not part of the model, so the Trainer misses them
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            heads = [p for p in self.referent_heads.parameters() if id(p) not in known]
            if heads:
                optimizer.add_param_group({"params": heads, "weight_decay": 0.0})
        return optimizer

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # each auxiliary loss alone, averaged since the last log
            for name, values in self._losses.items():
                if values:
                    logs[name] = round(sum(values) / len(values), 4)
                    values.clear()
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        answer_positions, focus_masks = inputs.pop("answer_positions", None), inputs.pop("focus_masks", None)
        referent_positions = inputs.pop("referent_positions", None)
        referent_targets = inputs.pop("referent_targets", None)
        outputs = model(
            **inputs, output_attentions=bool(self.focus_weight), output_hidden_states=bool(self.referent_weight)
        )
        loss = outputs.loss
        if self.focus_weight:
            focus_loss = self._focus_loss(model, inputs, outputs, answer_positions, focus_masks)
            self._losses["focus_loss"].append(float(focus_loss.detach()))
            loss = loss + self.focus_weight * focus_loss
        if self.referent_weight:
            referent_loss = self._referent_loss(outputs.hidden_states, referent_positions, referent_targets)
            self._losses["referent_loss"].append(float(referent_loss.detach()))
            loss = loss + self.referent_weight * referent_loss
        return (loss, outputs) if return_outputs else loss

    def _focus_loss(self, model, inputs, outputs, positions, masks) -> torch.Tensor:
        visual = inputs["input_ids"] == model.config.image_token_id  # (batch, seq), the same count in every row
        rows = torch.arange(positions.shape[0])[:, None].expand_as(positions)
        losses = []
        for layer in self.focus_layers:
            attention = outputs.attentions[layer].mean(1)  # (batch, seq, seq), averaged over heads
            at_answers = attention[rows, positions]  # (batch, turns, seq)
            on_image = at_answers[visual[:, None, :].expand_as(at_answers)].view(*positions.shape, -1)
            share = (on_image * masks).sum(-1) / on_image.sum(-1).clamp_min(1e-9)
            losses.append(-share[masks.any(-1)].clamp_min(1e-6).log())
        losses = torch.cat(losses)
        return losses.mean() if losses.numel() else outputs.loss * 0  # no named object in the batch

    def _referent_loss(self, hidden_states, positions, targets) -> torch.Tensor:
        """Cross-entropy of every head on every record, summed over its targets, averaged over records and layers."""
        valid = positions >= 0  # padding slots are -1
        rows = torch.arange(positions.shape[0])[:, None].expand_as(positions)[valid]
        positions, places, targets = positions[valid], targets[valid][:, 0], targets[valid][:, 1:]
        total, count = hidden_states[0].new_zeros(()), 0
        for place_index, place in enumerate(REFERENT_PLACES):
            chosen = places == place_index
            if not chosen.any():
                continue
            for layer in self.referent_layers[place]:
                head = self.referent_heads[f"{place}:{layer}"]
                logits = head(hidden_states[layer][rows[chosen], positions[chosen]]).split(REFERENT_HEADS, dim=-1)
                for index, part in enumerate(logits):
                    target = targets[chosen][:, index]
                    total = total + nn.functional.cross_entropy(part, target, ignore_index=-100, reduction="sum")
                count += int(chosen.sum())
        return total / max(1, count)


def _arguments(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    logging_steps: int,
    schedule: str = "cosine",
    warmup_steps: int | None = None,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type=schedule,
        warmup_steps=max(1, steps // 20) if warmup_steps is None else warmup_steps,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


@torch.no_grad()
def evaluate_patches(pretrainer: PatchPretrainer, image_processor, n: int = 100) -> dict:
    """Stage 1 quality on validation scenes: per-patch shape / colour accuracy on objects, centre flags."""
    dataset = PatchDataset(image_processor, n, SPLIT_SEEDS["validation"])
    batch = [dataset[i] for i in range(n)]
    shape, color, centre, cell = pretrainer.eval()(torch.stack([b["pixel_values"] for b in batch]))["logits"]
    pretrainer.train()
    targets = torch.stack([b["patch_labels"] for b in batch])
    on_object, is_centre = targets[..., 0] > 0, targets[..., 2] > 0
    return {
        "object_patch_shape_accuracy": (shape.argmax(-1) == targets[..., 0])[on_object].float().mean().item(),
        "object_patch_color_accuracy": (color.argmax(-1) == targets[..., 1])[on_object].float().mean().item(),
        "background_accuracy": (shape.argmax(-1) == 0)[~on_object].float().mean().item(),
        "centre_recall": (centre > 0)[is_centre].float().mean().item(),
        "centre_precision": is_centre[centre > 0].float().mean().item(),
        "centre_patch_shape_accuracy": (shape.argmax(-1) == targets[..., 0])[is_centre].float().mean().item(),
        "cell_accuracy": (cell.argmax(-1) == targets[..., 3]).float().mean().item(),
    }


def evaluate(model, processor, n: int, batch_size: int = 50) -> dict:
    """Validation accuracy per type with all visual tokens and with the visual tokens replaced by noise."""
    examples = make_split("validation", n)
    types, answers = [e.type for e in examples], [e.answer for e in examples]
    model.eval()
    full = accuracy_by_type(types, predict(model, processor, examples, batch_size, progress=True), answers)
    with noise_visual_tokens(model):
        noise = accuracy_by_type(types, predict(model, processor, examples, batch_size), answers)
    return {"n": n, "accuracy": full, "noise_accuracy": noise, "chance": chance_accuracy(types)}


class ValidationCallback(TrainerCallback):
    """Validation accuracy every `every` steps, logged with the loss, so a long run shows when it starts
    using the image (from scratch, accuracy sits at the question-only prior for a while, then climbs)."""

    def __init__(self, model, processor, every: int, n: int = 150, save_to: Path | None = None):
        self.model, self.processor, self.every, self.save_to = model, processor, every, save_to
        self.examples = make_split("validation", n)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            was_training = self.model.training
            predictions = predict(self.model.eval(), self.processor, self.examples, 50)
            self.model.train(was_training)
            types, answers = [e.type for e in self.examples], [e.answer for e in self.examples]
            accuracy = accuracy_by_type(types, predictions, answers)
            state.log_history.append({"step": state.global_step, "val_accuracy": accuracy["overall"]})
            print(f"step {state.global_step} validation", json.dumps({k: round(v, 3) for k, v in accuracy.items()}))
            if self.save_to is not None:  # a long run can be stopped any time and still leave a usable model
                save(self.model, self.processor, self.save_to)


class DropAugmentation(TrainerCallback):
    """Visual tokens dropped by `config` in the training steps from `start` on; validation and saves see them all.

    Dropping tokens at random on PyramidDrop's schedule makes the model read what an answer needs before the first
    drop, so that any ranking's drops cost it less; unlike PyramidDrop training it favours no ranking.
    """

    def __init__(self, model: nn.Module, config: PyramidDropConfig, start: int = 0):
        self.model, self.config, self.start = model, config, start

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.start:
            apply_pyramid_drop(self.model, self.config)

    def on_step_end(self, args, state, control, **kwargs):
        if is_pyramid_drop_applied(self.model):
            remove_pyramid_drop(self.model)


@dataclass(frozen=True)
class Phase:
    steps: int
    scene_objects: tuple[int, int] = (3, 6)
    question_type: str | None = None  # one type only (single-turn), or all types (multi-turn)


def _layer_list(flag: str, spec: str, highest: int, example: str) -> list[int]:
    message = f"{flag} {spec!r}: give 0-based layer numbers of the language model (0-{highest}) "
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(message + f"separated by commas, e.g. {example}") from None
    if not layers or layers[0] < 0 or layers[-1] > highest:
        raise SystemExit(message + f"in that range, e.g. {example}")
    return layers


def curriculum_phases(curriculum: str, steps: int) -> list[Phase]:
    """`"150:1-1:color,300:2-4:color,800:2-4"` -> those phases, then the rest of `steps` on full scenes.

    From scratch, a model shown only the full mix sits at the question-only prior for thousands of steps:
    finding a named object among several (binding the question's words to one object's tokens) is the hard
    part, and five question types pull at once. One type on one object teaches it to read the image in
    ~100 steps; then the same type with distractors teaches binding; then the mix.
    """
    phases = []
    for part in filter(None, curriculum.split(",")):
        try:
            count, sizes, *kind = part.split(":")
            low, high = (int(x) for x in sizes.split("-"))
            if kind and kind[0] not in QUESTION_TYPES:
                raise ValueError(kind[0])
            phases.append(Phase(int(count), (low, high), kind[0] if kind else None))
        except ValueError as error:
            raise ValueError(
                f"--curriculum {curriculum!r}: write phases as STEPS:MIN-MAX[:TYPE] with TYPE one of "
                f"{', '.join(QUESTION_TYPES)}, e.g. 150:1-1:color,800:2-4"
            ) from error
    remaining = steps - sum(phase.steps for phase in phases)
    if remaining <= 0 and steps > 0:
        raise ValueError(f"--curriculum uses {steps - remaining} steps but --steps is {steps}: raise --steps")
    return [*phases, Phase(remaining)] if steps > 0 else []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (model, processor, logs)")
    parser.add_argument("--vision-steps", type=int, default=1000, help="stage 1 steps (per-patch pre-training)")
    parser.add_argument("--steps", type=int, default=6000, help="stage 2 steps (VQA)")
    parser.add_argument("--batch-size", type=int, default=16, help="stage 2 batch size")
    parser.add_argument("--vision-batch-size", type=int, default=32, help="stage 1 batch size")
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--turns", type=int, default=8, help="questions per training image (multi-turn)")
    parser.add_argument("--train-vision", action="store_true", help="also update the vision tower in stage 2")
    parser.add_argument(
        "--align-projector",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the projector in stage 1 too (the head reads its output)",
    )
    parser.add_argument("--freeze-projector", action="store_true", help="keep the projector fixed in stage 2")
    parser.add_argument(
        "--row-col-targets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stage 1 also predicts each patch's grid row and column",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help="language model width")
    parser.add_argument("--layers", type=int, default=8, help="language model decoder layers")
    parser.add_argument(
        "--rope-theta",
        type=float,
        help="language model RoPE base (default 1e8 for a new model; with --init, changes the loaded model's)",
    )
    parser.add_argument("--init", type=Path, help="start from a saved model directory instead of from scratch")
    parser.add_argument(
        "--vision-from", type=Path, help="copy the vision tower of a saved model (then use --vision-steps 0)"
    )
    parser.add_argument(
        "--init-std",
        type=float,
        help="std of the language model's initial weights (default: width**-0.5; HF's 0.02 is made for wide models)",
    )
    parser.add_argument("--data-start", type=int, default=0, help="first stage 2 index of the training stream")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--eval-size", type=int, default=500, help="validation examples scored at the end")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--val-every", type=int, default=250, help="stage 2 steps between validation scores (0: off)")
    parser.add_argument(
        "--drop-lam", type=float, help="train stage 2 with PyramidDrop: keep lam**s of the visual tokens in stage s"
    )
    parser.add_argument("--drop-stages", type=int, default=4, help="PyramidDrop stages with --drop-lam")
    parser.add_argument(
        "--augment-drop-lam",
        type=float,
        help="drop visual tokens at random on PyramidDrop's lam schedule in the last --augment-drop-steps steps, an "
        "augmentation that favours no ranking (validation and the saved model keep every token); 0: off; "
        "default 0.3, off with --drop-lam or --focus-weight",
    )
    parser.add_argument("--augment-drop-steps", type=int, default=1500, help="stage 2 steps with --augment-drop-lam")
    parser.add_argument(
        "--drop-method",
        default="pdrop",
        choices=sorted(SCORERS),
        help="how --drop-lam ranks the visual tokens it keeps",
    )
    parser.add_argument(
        "--focus-weight",
        type=float,
        default=0.0,
        help="weight of the grounding loss (attention of each answer's last prompt token on its object; 0: off)",
    )
    parser.add_argument(
        "--focus-layers",
        default="2,4,6",
        help="decoder layers (0-based, comma-separated) whose attention --focus-weight supervises",
    )
    parser.add_argument(
        "--referent-weight",
        type=float,
        default=0.5,
        help="weight of the referent loss (what the object a phrase names is, read at the phrase's last word; 0: off)",
    )
    parser.add_argument(
        "--referent-layers",
        default="2",
        help="the hidden states entering these decoder layers (0-based, comma-separated) get --referent-weight",
    )
    parser.add_argument(
        "--referent-answer-layers",
        default="",
        help="with --referent-weight, the answer's last prompt token entering these layers must know it too (e.g. 6)",
    )
    parser.add_argument(
        "--no-referent-count",
        dest="referent_count",
        action="store_false",
        help="leave count questions out of the referent loss (the first runs with it did)",
    )
    parser.add_argument(
        "--curriculum",
        default="150:1-1:color,1500:2-4",
        help="stage 2 phases before the full mix: STEPS:MIN-MAX objects[:one question type], comma-separated",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 30 + 40 steps of batch 8, 50 eval")
    args = parser.parse_args(argv)
    if args.rope_theta is not None and args.rope_theta <= 1:
        parser.error(f"--rope-theta {args.rope_theta}: the RoPE base must be above 1 (Llama's default is 10000)")
    for flag, weight, example in (
        ("--focus-weight", args.focus_weight, 0.2),
        ("--referent-weight", args.referent_weight, 1),
    ):
        if weight < 0:
            parser.error(f"{flag} {weight}: give 0 (off) or a positive weight, e.g. {example}")
    if args.focus_weight and args.drop_lam is not None:
        parser.error(
            "--focus-weight supervises the attention on all 144 visual tokens; it cannot be combined with "
            "--drop-lam, which drops some of them: leave one of the two out"
        )
    if args.augment_drop_lam is None:  # 0.3, but off when --drop-lam or --focus-weight set how tokens are seen
        args.augment_drop_lam = 0.3 if args.drop_lam is None and not args.focus_weight else 0.0
    elif args.augment_drop_lam and (args.drop_lam is not None or args.focus_weight):
        parser.error(
            "--augment-drop-lam drops visual tokens at random in the last steps; it cannot be combined with "
            f"{'--drop-lam' if args.drop_lam is not None else '--focus-weight'}: leave one of the two out"
        )
    if args.augment_drop_lam and args.augment_drop_steps <= 0:
        parser.error(f"--augment-drop-steps {args.augment_drop_steps}: give a positive number of steps")
    if args.quick:
        args.vision_steps, args.steps, args.eval_size, args.logging_steps = 30, 40, 50, 5
        args.batch_size = args.vision_batch_size = 8
        args.curriculum, args.turns, args.augment_drop_steps = "10:1-2,10:2-4", min(args.turns, 2), 10
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init_std is None:
        # At width 128, HF's default 0.02 makes every attention logit ~0.05 at the start, and the query/key
        # weights grow slowly from that saddle: the model sat at the question-only prior for thousands of steps.
        # Unit-variance projections (std = width**-0.5) halved the loss of the binding phase in 400 steps.
        args.init_std = args.hidden_size**-0.5
    args.out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    started = time.time()
    if args.init:
        model, processor = load(args.init)
        if args.rope_theta is not None:
            set_rope_theta(model, args.rope_theta)
    else:
        model, processor = build_model(args.seed, args.hidden_size, args.layers, args.init_std, args.rope_theta or 1e8)
    if args.vision_from:
        model.model.vision_tower.load_state_dict(load(args.vision_from)[0].model.vision_tower.state_dict())
    num_layers = model.config.get_text_config().num_hidden_layers
    focus_layers = _layer_list("--focus-layers", args.focus_layers, num_layers - 1, "2,4,6")
    # hidden state k enters decoder layer k; k = num_layers is the last layer's output
    referent_layers = _layer_list("--referent-layers", args.referent_layers, num_layers, "2")
    answer_layers = []
    if args.referent_answer_layers.strip():
        answer_layers = _layer_list("--referent-answer-layers", args.referent_answer_layers, num_layers, "6")
    drop_config = augmentation = None
    if args.drop_lam is not None or args.augment_drop_lam:
        lam, method = (
            (args.drop_lam, args.drop_method) if args.drop_lam is not None else (args.augment_drop_lam, "random")
        )
        drop_config = PyramidDropConfig.from_lambda(num_layers, args.drop_stages, lam, method=method)
        drop_config.validate_for(num_layers)
        first_drop = drop_config.layer_list[0]  # hidden states entering layers up to this one are taken before it
        if args.referent_weight and max(referent_layers + answer_layers) > first_drop:
            raise SystemExit(
                f"--referent-layers / --referent-answer-layers {max(referent_layers + answer_layers)} read hidden "
                f"states after the first drop (after layer {first_drop} with --drop-lam or --augment-drop-lam), where "
                f"the question's tokens have moved: use layers <= {first_drop}"
            )
    phases = curriculum_phases(args.curriculum, args.steps)
    if args.augment_drop_lam and phases:
        if args.augment_drop_steps > phases[-1].steps:
            raise SystemExit(
                f"--augment-drop-steps {args.augment_drop_steps} must fit in the last stage 2 phase "
                f"({phases[-1].steps} steps): lower it, or raise --steps"
            )
        augmentation = DropAugmentation(model, drop_config, start=phases[-1].steps - args.augment_drop_steps)
    attention_kernel = model.config._attn_implementation
    model.train()
    curve, patch_metrics = [], {}

    if args.vision_steps > 0:
        projector = model.model.multi_modal_projector if args.align_projector else None
        width = model.config.text_config.hidden_size if projector else model.config.vision_config.hidden_size
        pretrainer = PatchPretrainer(model.model.vision_tower, projector, width, args.row_col_targets)
        trainer = Trainer(
            model=pretrainer,
            args=_arguments(
                args.out / "stage1",
                args.vision_steps,
                args.vision_batch_size,
                args.vision_lr,
                args.seed,
                args.logging_steps,
            ),
            train_dataset=PatchDataset(processor.image_processor, args.vision_steps * args.vision_batch_size),
        )
        trainer.train()
        curve += [{"stage": "vision"} | entry for entry in trainer.state.log_history if "loss" in entry]
        patch_metrics = evaluate_patches(pretrainer, processor.image_processor, 200)
        print("patch metrics:", json.dumps(patch_metrics))
    vision_seconds = time.time() - started

    if args.focus_weight:
        model.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
    if args.drop_lam is not None:  # PyramidDrop training: every step drops, and the model is saved with it
        apply_pyramid_drop(model, drop_config)
    heads = None  # the referent heads: one set for the whole run, kept across phases
    if args.referent_weight:
        heads = referent_heads(model.config.get_text_config().hidden_size, referent_layers, answer_layers)
    stage2_seconds = 0.0
    start = args.data_start
    for number, phase in enumerate(phases):
        steps, scene_objects = phase.steps, phase.scene_objects
        model.model.vision_tower.requires_grad_(args.train_vision)
        model.model.multi_modal_projector.requires_grad_(not args.freeze_projector)
        first, last = number == 0, number == len(phases) - 1
        kind = phase.question_type or "all types"
        print(
            f"VQA phase {number + 1}/{len(phases)}: {steps} steps, {scene_objects[0]}-{scene_objects[1]} objects, {kind}"
        )
        grounding = {}
        if args.focus_weight:
            grounding |= {"focus_weight": args.focus_weight, "focus_layers": focus_layers}
        if args.referent_weight:
            grounding |= {
                "referent_weight": args.referent_weight,
                "referent_layers": referent_layers,
                "answer_layers": answer_layers,
                "referent_heads": heads,
            }
        trainer = (GroundingTrainer if grounding else Trainer)(
            model=model,
            **grounding,
            args=_arguments(
                args.out / "stage2",
                steps,
                args.batch_size,
                args.lr,
                args.seed + number,
                args.logging_steps,
                schedule="cosine" if last else "constant_with_warmup",
                warmup_steps=max(1, min(args.steps // 20, steps // 3)) if first else 0,  # within phase 1
            ),
            train_dataset=VQADataset(
                processor,
                steps * args.batch_size,
                turns=args.turns,
                start=start,
                scene_objects=scene_objects,
                question_type=phase.question_type,
                focus=bool(args.focus_weight),
                referents=bool(args.referent_weight),
                referent_count=args.referent_count,
            ),
            data_collator=collate_vqa(processor.tokenizer.pad_token_id),
            # the augmentation first: its step end removes the drops before the validation's step end
            callbacks=([augmentation] if augmentation and last else [])
            + [ValidationCallback(model, processor, args.val_every, save_to=args.out)],
        )
        stage2_seconds += trainer.train().metrics["train_runtime"]
        start += steps * args.batch_size
        curve += [
            {"stage": f"vqa{number + 1}"} | entry
            for entry in trainer.state.log_history
            if "loss" in entry or "val_accuracy" in entry
        ]
    train_seconds = time.time() - started

    model.requires_grad_(True)
    model.set_attn_implementation(attention_kernel)
    for stage in ("stage1", "stage2"):  # the Trainer's output dirs stay empty with save_strategy="no"
        with contextlib.suppress(OSError):
            (args.out / stage).rmdir()
    save(model, processor, args.out)
    metrics = evaluate(model, processor, args.eval_size) if args.eval_size else {}
    metrics |= {
        "patch_metrics": patch_metrics,
        "vision_train_seconds": round(vision_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "vqa_seconds_per_step": round(stage2_seconds / max(1, args.steps), 4),
        "pyramid_drop": model.config.to_dict().get("pyramid_drop"),
        "total_seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with (args.out / "loss_curve.csv").open("w", newline="") as handle:
        fields = [
            "stage",
            "step",
            "loss",
            "focus_loss",
            "referent_loss",
            "val_accuracy",
            "learning_rate",
            "grad_norm",
            "epoch",
        ]
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(curve)
    metrics["model_dir_mb"] = round(directory_size_mb(args.out), 2)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = ("accuracy", "noise_accuracy", "chance", "total_seconds", "model_dir_mb")
    print(json.dumps({key: metrics.get(key) for key in summary}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
