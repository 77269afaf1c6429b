"""Scoring a model while and after it trains: validation accuracy per type, with and without the image."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from pyramiddrop.synthetic.data import accuracy_by_type, chance_accuracy, make_split
from pyramiddrop.synthetic.model import predict, save, scenes_of
from pyramiddrop.tools.evaluate import noise_visual_tokens


def evaluate(model, processor, n: int, batch_size: int = 50) -> dict:
    """Validation accuracy per type with all visual tokens and with the visual tokens replaced by noise."""
    examples = make_split("validation", n, scenes_of(model))
    types, answers = [e.type for e in examples], [e.answer for e in examples]
    model.eval()
    full = accuracy_by_type(types, predict(model, processor, examples, batch_size, progress=True), answers)
    with noise_visual_tokens(model):
        noise = accuracy_by_type(types, predict(model, processor, examples, batch_size), answers)
    return {"n": n, "accuracy": full, "noise_accuracy": noise, "chance": chance_accuracy(types)}


class ValidationCallback(TrainerCallback):
    """Validation accuracy every `every` steps, logged with the loss, and a save of the model, so a long run shows
    when it starts using the image and can be stopped at any time with a usable model."""

    def __init__(self, model, processor, every: int, n: int = 150, save_to: Path | None = None):
        self.model, self.processor, self.every, self.save_to = model, processor, every, save_to
        self.examples = make_split("validation", n, scenes_of(model))

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            was_training = self.model.training
            predictions = predict(self.model.eval(), self.processor, self.examples, 50)
            self.model.train(was_training)
            types, answers = [e.type for e in self.examples], [e.answer for e in self.examples]
            accuracy = accuracy_by_type(types, predictions, answers)
            state.log_history.append({"step": state.global_step, "val_accuracy": accuracy["overall"]})
            print(f"step {state.global_step} validation", json.dumps({k: round(v, 3) for k, v in accuracy.items()}))
            if self.save_to is not None:
                save(self.model, self.processor, self.save_to)
