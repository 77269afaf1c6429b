"""Stage 2 of the recipe: VQA samples (multi-turn, loss on the answers only), their collator and the curriculum.

The whole stage is one stream read in order: sample `i` belongs to training step `i // batch_size`, and the
curriculum phase of that step decides the scene size and the question types. One stream and one `Trainer` make
a run resumable from any checkpoint (the Trainer restores the optimizer, the schedule and the position in the
stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyramiddrop.synthetic.data import DEFAULT_SCENES, SPLIT_SEEDS, build_prompt, extra_questions, make_example
from pyramiddrop.synthetic.scene import scene_set


@dataclass(frozen=True)
class Phase:
    steps: int
    scene_objects: tuple[int, int] = (3, 6)
    question_type: str | None = None  # one type only (single-turn), or all types (multi-turn)


def curriculum_phases(curriculum: str, steps: int, scenes: str = DEFAULT_SCENES) -> list[Phase]:
    """`"150:1-1:color,1500:2-4"` -> those phases, then the rest of `steps` on full 3-6 object scenes.

    From scratch, a model shown only the full mix sits at the question-only prior for a long time: finding a named
    object among several is the hard part. One type on one object teaches it to read the image in ~100 steps;
    smaller scenes then teach finding an object among a few.
    """
    types = scene_set(scenes).question_types
    phases = []
    for part in filter(None, curriculum.split(",")):
        try:
            count, sizes, *kind = part.split(":")
            low, high = (int(x) for x in sizes.split("-"))
            if kind and kind[0] not in types:
                raise ValueError(kind[0])
            if int(count) <= 0 or not 1 <= low <= high <= 9:
                raise ValueError(part)
            phases.append(Phase(int(count), (low, high), kind[0] if kind else None))
        except ValueError as error:
            raise ValueError(
                f"--curriculum {curriculum!r}: write phases as STEPS:MIN-MAX[:TYPE] (STEPS > 0, 1 <= MIN <= MAX <= 9 "
                f"objects, TYPE one of the {scenes} scenes' {', '.join(types)}), e.g. 150:1-1:color,1500:2-4"
            ) from error
    remaining = steps - sum(phase.steps for phase in phases)
    if remaining <= 0 and steps > 0:
        raise ValueError(f"--curriculum uses {steps - remaining} steps but --steps is {steps}: raise --steps")
    return [*phases, Phase(remaining)] if steps > 0 else []


def phase_number(phases: list[Phase], step: int) -> int:
    """1-based number of the phase that training step `step` (1-based, as the Trainer counts) belongs to."""
    for number, phase in enumerate(phases, 1):
        if step <= phase.steps:
            return number
        step -= phase.steps
    return len(phases)


class VQADataset(torch.utils.data.Dataset):
    """Prompt + answer + </s> (+ more turns about the same image), labels -100 everywhere but answers and </s>.

    `phases` cover `sum(p.steps)` steps of `batch_size` samples each; sample `i` is drawn for the phase of step
    `i // batch_size` from the training stream at index `start + i` (one-type phases take one index in n types, so
    their answers stay balanced). Multi-turn packing ("USER: q2 ASSISTANT: a2</s>...", the chat template's format)
    buys `turns` answers for one pass over the visual tokens; one-type phases are single-turn.
    """

    def __init__(
        self,
        processor,
        phases: list[Phase],
        batch_size: int,
        turns: int = 1,
        start: int = 0,
        seed: int = SPLIT_SEEDS["train"],
        scenes: str = DEFAULT_SCENES,
    ):
        self.processor, self.phases, self.batch_size = processor, phases, batch_size
        self.turns, self.start, self.seed, self.scenes = turns, start, seed, scenes
        self.length = sum(phase.steps for phase in phases) * batch_size

    def __len__(self) -> int:
        return self.length

    def phase_of(self, index: int) -> Phase:
        if not 0 <= index < self.length:  # the stream is endless; the bound lets list() and for-loops stop
            raise IndexError(f"index {index} outside a dataset of {self.length} samples")
        return self.phases[phase_number(self.phases, index // self.batch_size + 1) - 1]

    def __getitem__(self, index: int) -> dict:
        phase = self.phase_of(index)
        index += self.start
        if phase.question_type is not None:  # types cycle with the index: keep one in n, answers stay balanced
            types = scene_set(self.scenes).question_types
            index = index * len(types) + types.index(phase.question_type)
        example = make_example(self.seed, index, phase.scene_objects, self.scenes)
        inputs = self.processor(images=example.image(), text=build_prompt(example.question), return_tensors="pt")
        tokenizer = self.processor.tokenizer
        input_ids = inputs["input_ids"][0].tolist()
        labels = [-100] * len(input_ids)
        turns = 1 if phase.question_type is not None else self.turns
        more = extra_questions(example.scene, self.seed, index, turns - 1)
        for turn, (question, answer, _) in enumerate([(example.question, example.answer, example.type), *more]):
            if turn:
                ids = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
                input_ids, labels = input_ids + ids, labels + [-100] * len(ids)
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            input_ids, labels = input_ids + ids, labels + ids
        return {"input_ids": input_ids, "labels": labels, "pixel_values": inputs["pixel_values"][0]}


def conversations(
    count: int, turns: int = 1, start: int = 0, seed: int = SPLIT_SEEDS["train"], scenes: str = DEFAULT_SCENES
) -> list[dict]:
    """`count` samples of the stream in the chat format TRL's vision-language path reads: `{"images": [PIL image],
    "messages": [user, assistant, ...]}`, `turns` questions about each image (full 3-6 object scenes)."""
    rows = []
    for index in range(start, start + count):
        example = make_example(seed, index, scenes=scenes)
        more = extra_questions(example.scene, seed, index, turns - 1)
        messages = []
        for question, answer, _ in [(example.question, example.answer, example.type), *more]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"images": [example.image()], "messages": messages})
    return rows


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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
        }

    return collate
