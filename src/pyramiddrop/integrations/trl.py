"""TRL's `SFTTrainer` with PyramidDrop: TRL's data path (chat templates, its vision-language collator, assistant-only
and completion-only label masks, PEFT set-up), with the loss the model computes itself.

TRL 1.x computes the SFT loss outside the model, from the backbone's last hidden state against the labels
(`model(**inputs, fused_lm_head=True)`). PyramidDrop shortens that sequence inside the language model, so the
two cannot line up (the engine refuses the call with an error naming this class). `PyramidDropSFTTrainer` takes
the loss from the model's output as `transformers.Trainer` does: the engine computes it on the kept tokens with the
labels gathered to them. TRL's `entropy` and `mean_token_accuracy` logs, computed in its fused path, are left out,
and only TRL's default `loss_type="nll"` applies.
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer


class PyramidDropSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` for a model patched with `apply_pyramid_drop`; same arguments."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll":
            raise ValueError(
                f"PyramidDropSFTTrainer trains with the model's own next-token loss; loss_type={self.args.loss_type!r} "
                "needs TRL's fused loss path, which PyramidDrop cannot feed. Use SFTConfig(loss_type='nll')."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False  # as SFTTrainer does: no cache in training
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
