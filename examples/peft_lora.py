"""LoRA fine-tuning with PyramidDrop: PEFT + the Hugging Face Trainer on the embedded synthetic LLaVA (CPU).

PyramidDrop drops visual tokens at every training step (lambda 0.5, 4 stages); the adapter is saved with the base
config (which carries the schedule), and the merged model keeps PyramidDrop applied.

Run: .venv/bin/python examples/peft_lora.py --steps 20 --out runs/peft_lora
"""

import argparse
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, Trainer, TrainingArguments

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, is_pyramid_drop_applied
from pyramiddrop.synthetic.data import make_split, score_answer
from pyramiddrop.synthetic.model import load, predict, require_embedded_model
from pyramiddrop.synthetic.vqa import Phase, VQADataset, collate_vqa

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--out", type=Path, default=Path("runs/peft_lora"))
args = parser.parse_args()

base_dir = require_embedded_model()
model, processor = load(base_dir)
apply_pyramid_drop(model, PyramidDropConfig.from_lambda(num_layers=8, num_stages=4, lam=0.5))
lora = LoraConfig(
    r=8, lora_alpha=16, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
)
model = get_peft_model(model, lora)  # the other order (wrap, then apply_pyramid_drop) gives the same model
model.print_trainable_parameters()

training = TrainingArguments(
    output_dir=str(args.out / "trainer"),
    max_steps=args.steps,
    per_device_train_batch_size=args.batch_size,
    learning_rate=5e-4,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    remove_unused_columns=False,  # the collator's pixel_values reach the model
)
data = VQADataset(processor, [Phase(args.steps)], args.batch_size, turns=4, start=1_000_000)
Trainer(
    model=model, args=training, train_dataset=data, data_collator=collate_vqa(processor.tokenizer.pad_token_id)
).train()

# The adapter, and the base config beside it: config.json carries the schedule ("pyramid_drop").
adapter_dir = args.out / "adapter"
model.save_pretrained(adapter_dir)
model.get_base_model().config.save_pretrained(adapter_dir)

# Reload: the base weights with the saved config, the adapter, and PyramidDrop from that config.
base = AutoModelForImageTextToText.from_pretrained(base_dir, config=AutoConfig.from_pretrained(adapter_dir))
reloaded = apply_pyramid_drop(PeftModel.from_pretrained(base, adapter_dir))
merged = reloaded.merge_and_unload()  # plain weights; the hooks stay
examples = make_split("validation", 50)
answers = predict(merged.eval(), processor, examples, batch_size=25)
accuracy = sum(score_answer(a, e.answer) for a, e in zip(answers, examples)) / len(examples)
print("merged model keeps PyramidDrop:", is_pyramid_drop_applied(merged))
print("visual tokens per stage:", [len(kept) for kept in get_drop_record(merged).kept_visual_indices[0]])
print(f"accuracy on 50 validation questions with PyramidDrop: {accuracy:.2f}")
