"""The short probes behind docs/synthetic.md ("What we learned"): which part of the synthetic task is slow.

    .venv/bin/python benchmarks/synthetic_probes.py focus MODEL_DIR OUT_DIR [STEPS]  # colour: 1 object, then 2-4
    .venv/bin/python benchmarks/synthetic_probes.py mix MODEL_DIR TURNS STEPS OUT_DIR  # the full mix, 2-4 objects

MODEL_DIR is any saved synthetic model whose vision tower is pre-trained (`pdrop train --steps 0 ...`).
"""

import sys

import torch
from transformers import Trainer

from pyramiddrop.synthetic.data import accuracy_by_type, make_example
from pyramiddrop.synthetic.model import load, predict, save
from pyramiddrop.synthetic.train import VQADataset, _arguments, collate_vqa


def train(model, processor, dataset, steps: int, lr: float) -> None:
    arguments = _arguments("/tmp/probe-trainer", steps, 16, lr, 0, 50, "constant_with_warmup", 20)
    collate = collate_vqa(processor.tokenizer.pad_token_id)
    Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collate).train()


def score(model, processor, sizes: tuple[int, int], only_type: str | None = None) -> dict:
    offset = ["color", "exists", "count", "spatial", "location"].index(only_type) if only_type else 0
    stride = 5 if only_type else 1
    examples = [make_example(1, i * stride + offset, sizes) for i in range(60 if only_type else 200)]
    answers = predict(model.eval(), processor, examples, 50)
    model.train()
    return accuracy_by_type([e.type for e in examples], answers, [e.answer for e in examples])


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    model, processor = load(argv[1])
    model.model.vision_tower.requires_grad_(False)
    if argv[0] == "focus":
        steps = int(argv[3]) if len(argv) > 3 else 120
        dataset = VQADataset(processor, steps * 16, scene_objects=(1, 1), question_type="color")
        train(model, processor, dataset, steps, 2e-3)
        print("colour, 1 object:", score(model, processor, (1, 1), "color"))
        train(model, processor, VQADataset(processor, 300 * 16, scene_objects=(2, 4), question_type="color"), 300, 2e-3)
        print("colour, 2-4 objects:", score(model, processor, (2, 4), "color"))
        print("colour, 3-6 objects:", score(model, processor, (3, 6), "color"))
        save(model, processor, argv[2])
    else:
        turns, steps = int(argv[2]), int(argv[3])
        dataset = VQADataset(processor, steps * 16, turns=turns, scene_objects=(2, 4), start=50000)
        train(model, processor, dataset, steps, 1e-3)
        print(f"mix, {turns} turn(s), 2-4 objects:", score(model, processor, (2, 4)))
        save(model, processor, argv[4])


if __name__ == "__main__":
    main(sys.argv[1:])
