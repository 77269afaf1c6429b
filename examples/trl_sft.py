"""TRL's SFTTrainer with PyramidDrop and LoRA on the embedded synthetic LLaVA (CPU), through TRL's own
vision-language data path: chat-format samples with images, the assistant-only loss, TRL's PEFT set-up.

`PyramidDropSFTTrainer` is `trl.SFTTrainer` taking the model's own loss (TRL's fused loss reads the backbone's
hidden states, which PyramidDrop shortens; the plain SFTTrainer is refused with an error saying so).

Run: .venv/bin/python examples/trl_sft.py --steps 10 --out runs/trl_sft
"""

import argparse
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.integrations.trl import PyramidDropSFTTrainer
from pyramiddrop.synthetic.model import TRAINING_CHAT_TEMPLATE, load, require_embedded_model
from pyramiddrop.synthetic.vqa import conversations

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--out", type=Path, default=Path("runs/trl_sft"))
args = parser.parse_args()

model, processor = load(require_embedded_model())
processor.chat_template = TRAINING_CHAT_TEMPLATE  # the model's template with {% generation %} around the answers
model.model.vision_tower.requires_grad_(False)
apply_pyramid_drop(model, PyramidDropConfig.from_lambda(num_layers=8, num_stages=4, lam=0.5))

# {"images": [PIL image], "messages": [user, assistant, user, assistant, ...]}: three questions per image.
dataset = Dataset.from_list(conversations(args.steps * args.batch_size, turns=3, start=1_000_000))
config = SFTConfig(
    output_dir=str(args.out),
    max_steps=args.steps,
    per_device_train_batch_size=args.batch_size,
    learning_rate=5e-4,
    assistant_only_loss=True,  # labels on the answers only: the engine ranks with the token before each answer
    max_length=None,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
)
lora = LoraConfig(
    r=8, lora_alpha=16, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
)
trainer = PyramidDropSFTTrainer(
    model=model, args=config, train_dataset=dataset, processing_class=processor, peft_config=lora
)
result = trainer.train()
print(f"training loss {result.training_loss:.4f}")
print(
    "visual tokens per stage at the last step:", [len(k) for k in get_drop_record(trainer.model).kept_visual_indices[0]]
)
