"""The shipped trained model: loads offline like a hub checkpoint, answers the test split, uses the image."""

import json

import torch

from pyramiddrop.cli import main
from pyramiddrop.synthetic.data import chance_accuracy, make_split
from pyramiddrop.synthetic.model import EMBEDDED_MODEL_DIR, NUM_VISUAL_TOKENS, directory_size_mb


def test_embedded_model_is_small_and_loads_with_the_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert directory_size_mb(EMBEDDED_MODEL_DIR) <= 25
    processor = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR)
    model = AutoModelForImageTextToText.from_pretrained(EMBEDDED_MODEL_DIR)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers >= 8
    example = next(example for example in make_split("test", 10) if example.type == "color")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=example.image(), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == NUM_VISUAL_TOKENS >= 144
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == example.answer


def test_pdrop_eval_on_the_default_model_reads_the_image(tmp_path, capsys):
    # The bars for the shipped weights: >= 85 % on these 200 questions with no drop (docs/synthetic.md: 99.9 %
    # on the whole test split) and PyramidDrop lam = 0.5 keeping >= 98 % of it; with noise for visual tokens it
    # falls to guessing.
    out = tmp_path / "rows.json"
    main(["eval", "--limit", "200", "--lam", "0.5", "--noise-control", "--per-type", "--json", str(out)])
    rows = {row["method"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"none", "noise", "pdrop", "fastv", "random"} and all(row["n"] == 200 for row in rows.values())
    chance = chance_accuracy([example.type for example in make_split("test", 200)])
    per_type = rows["none"]["accuracy_per_type"]
    assert rows["none"]["accuracy"] >= 0.85
    assert min(per_type.values()) >= 0.85, per_type
    assert rows["pdrop"]["accuracy"] >= 0.98 * rows["none"]["accuracy"]
    assert rows["noise"]["accuracy"] <= chance + 0.05
    assert rows["pdrop"]["settings"]["lam"] == 0.5
    assert rows["pdrop"]["avg_visual_tokens"] < 0.5 * NUM_VISUAL_TOKENS < rows["none"]["avg_visual_tokens"]
    assert "retain" in capsys.readouterr().out  # the table is printed
