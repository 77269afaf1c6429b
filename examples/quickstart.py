"""PyramidDrop on a tiny LLaVA in a few lines, checked against the official implementation's outputs.

Run: .venv/bin/python examples/quickstart.py
"""

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record, remove_pyramid_drop
from pyramiddrop.flops import prefill_flops

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "official_pdrop_public"
case = torch.load(REFERENCE / "cases.pt", weights_only=True)["cases"]["P2"]
model = LlavaForConditionalGeneration.from_pretrained(REFERENCE / "model", dtype=torch.float32).eval()
inputs = {"input_ids": case["input_ids"], "pixel_values": case["pixel_values"]}

config = PyramidDropConfig(layer_list=[2, 4, 6], image_token_ratio_list=[0.6, 0.3, 0.15])
model = apply_pyramid_drop(model, config)
with torch.no_grad():
    tokens = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, -8:]

record = get_drop_record(model)
print("visual tokens per stage:", [len(kept) for kept in record.kept_visual_indices[0]])
print("tokens per layer:       ", record.tokens_per_layer[0].tolist())
print("greedy tokens:          ", tokens.tolist())
print(
    "official PyramidDrop:   ",
    case["tokens"].tolist(),
    "(equal)" if tokens.tolist() == case["tokens"].tolist() else "(DIFFERENT)",
)
full, dropped = (prefill_flops(model.config, 17, 256, c) for c in (None, config))
print(f"end-to-end prefill FLOPs: {dropped:.3g} vs {full:.3g} without dropping ({1 - dropped / full:.0%} saved)")

remove_pyramid_drop(model)  # the unmodified model again
