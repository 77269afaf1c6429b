"""The short probes behind docs/synthetic.md ("What we learned"): which part of the synthetic task is slow.

    .venv/bin/python benchmarks/synthetic_probes.py focus MODEL_DIR OUT_DIR [STEPS]  # colour: 1 object, then 2-4
    .venv/bin/python benchmarks/synthetic_probes.py mix MODEL_DIR TURNS STEPS OUT_DIR  # the full mix, 2-4 objects
    .venv/bin/python benchmarks/synthetic_probes.py features MODEL_DIR  # what the LM's visual inputs carry
    .venv/bin/python benchmarks/synthetic_probes.py cells MODEL_DIR     # test accuracy per asked cell / spatial axis / exists distractors
    .venv/bin/python benchmarks/synthetic_probes.py referents MODEL_DIR [N]  # what the LM's hidden states know

MODEL_DIR is any saved synthetic model whose vision tower is pre-trained (`pdrop train --steps 0 ...`).
"""

import collections
import sys

import torch
from transformers import Trainer

from pyramiddrop.synthetic.data import ANSWERS, accuracy_by_type, build_prompt, make_example, make_split, score_answer
from pyramiddrop.synthetic.model import load, predict, save
from pyramiddrop.synthetic.train import VQADataset, _arguments, collate_vqa, patch_targets, referent_targets


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


@torch.no_grad()
def visual_features(model, processor, count: int = 120) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vision tower's patch outputs, the projector's outputs (the language model's visual inputs) and the
    stage 1 patch targets, for `count` validation scenes."""
    tower, projected, targets = [], [], []
    for index in range(count):
        example = make_example(1, index)
        pixels = processor.image_processor(example.image(), return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        tower.append(hidden[0, 1:])  # CLS dropped, as vision_feature_select_strategy="default" does
        projected.append(model.model.multi_modal_projector(hidden[:, 1:])[0])
        targets.append(patch_targets(example.scene))
    return torch.cat(tower), torch.cat(projected), torch.cat(targets)


def linear_probe(features: torch.Tensor, labels: torch.Tensor, train_fraction: float = 2 / 3) -> torch.Tensor:
    """Per-row correctness of a softmax regression (standardised features) on the held-out rows."""
    split = int(len(features) * train_fraction)
    features = (features - features[:split].mean(0)) / features[:split].std(0).clamp_min(1e-6)
    classes = int(labels.max()) + 1
    weight = torch.zeros(features.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(300):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(features[:split] @ weight + bias, labels[:split]).backward()
            optimizer.step()
    return ((features[split:] @ weight + bias).argmax(-1) == labels[split:]).float()


def variance_share(features: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of the features' variance that the labels' class means explain (between-class / total)."""
    centred = features - features.mean(0)
    onehot = torch.nn.functional.one_hot(labels).float()
    means = (onehot.T @ centred) / onehot.sum(0)[:, None].clamp_min(1)
    return float(((onehot @ means) ** 2).sum() / (centred**2).sum())


@torch.no_grad()
def referent_probes(model, processor, count: int) -> None:
    """Linear probes, at every depth, on the hidden states of exists and spatial questions (a fresh stream): does
    the last word of "the red circle" know whether that object exists and where it is, and does the last prompt
    token know the answer? (`--referent-weight` trains exactly the first two.)"""
    examples = [make_example(9, i) for i in range(count * 5) if i % 5 in (1, 3)]  # exists, spatial
    records = collections.defaultdict(lambda: ([], []))  # name -> (features per depth, labels)
    for start in range(0, len(examples), 50):
        batch = examples[start : start + 50]
        inputs = processor(
            images=[e.image() for e in batch],
            text=[build_prompt(e.question) for e in batch],
            return_tensors="pt",
            padding=True,
        )
        hidden = torch.stack(model(**inputs, output_hidden_states=True).hidden_states, 1)  # (B, depth, T, D)
        for row, example in enumerate(batch):
            length = len(processor.tokenizer(example.question, add_special_tokens=False)["input_ids"])
            first = hidden.shape[2] - 2 - length  # left padding: the question ends before "assistant :"
            answer = ANSWERS[example.type].index(example.answer)
            records[f"{example.type} answer @ last prompt token"][0].append(hidden[row, :, -1])
            records[f"{example.type} answer @ last prompt token"][1].append(answer)
            for number, (index, target) in enumerate(referent_targets(example.scene, example.question, length)):
                phrase = f"{example.type} object {number + 1}" if example.type == "spatial" else "exists object"
                wanted = {"present": target[0]} if example.type == "exists" else {"column": target[2], "row": target[1]}
                for name, label in wanted.items():
                    records[f"{phrase} {name} @ its last word"][0].append(hidden[row, :, first + index])
                    records[f"{phrase} {name} @ its last word"][1].append(label)
    print(f"held-out linear probe accuracy, by hidden state (k enters decoder layer k), {count} questions per type")
    for name, (features, labels) in sorted(records.items()):
        features, labels = torch.stack(features), torch.tensor(labels)
        scores = [linear_probe(features[:, depth], labels).mean().item() for depth in range(features.shape[1])]
        print(f"{name:<42} " + " ".join(f"{score:.2f}" for score in scores))


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    model, processor = load(argv[1])
    if argv[0] == "cells":
        examples = [e for e in make_split("test") if e.type in ("location", "spatial", "exists")]
        correct = collections.defaultdict(list)
        for example, answer in zip(examples, predict(model.eval(), processor, examples, 50)):
            if example.type == "location":
                key = "location: " + example.question.split(" in the ")[1].rstrip("?")
            elif example.type == "exists":  # does a scene with the colour and the shape on other objects fool it?
                shape, color = example.query["shape"], example.query["color"]
                both = any(o.color == color and o.shape != shape for o in example.scene.objects) and any(
                    o.shape == shape and o.color != color for o in example.scene.objects
                )
                key = f"exists {example.answer}: " + ("both distractors" if both else "not both")
            else:
                key = "spatial: " + ("left or right" if "left or right" in example.question else "above or below")
            correct[key].append(score_answer(answer, example.answer))
        for key in sorted(correct):
            print(f"{key:<28} {sum(correct[key]) / len(correct[key]):6.1%} of {len(correct[key])}")
        return
    if argv[0] == "referents":
        referent_probes(model.eval(), processor, int(argv[2]) if len(argv) > 2 else 1500)
        return
    if argv[0] == "features":
        tower, projected, targets = visual_features(model.eval(), processor)
        text_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
        print(
            f"mean norm: projected visual tokens {projected.norm(dim=-1).mean():.1f}, word embeddings {text_norm:.2f}"
        )
        on_object = targets[int(len(targets) * 2 / 3) :, 0] > 0
        objects = targets[:, 0] > 0
        for where, features in [("vision tower", tower), ("projector", projected)]:
            for column, name in [(0, "shape"), (1, "colour"), (3, "cell")]:
                correct = linear_probe(features, targets[:, column])
                share = variance_share(features[objects], targets[objects, column])
                print(
                    f"{where} output, {name}: linear probe {correct.mean():.1%} of all patches, "
                    f"{correct[on_object].mean():.1%} of object patches; {share:.1%} of the object patches' variance"
                )
        return
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
