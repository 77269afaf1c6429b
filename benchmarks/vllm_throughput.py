"""vLLM with PyramidDrop: prefill and decode speed of no drop, PyramidDrop (lambda = 0.5, 4 stages) and FastV at
PyramidDrop's average visual-token budget, three engines in one process, runs interleaved (docs/serving.md).

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--layers 16] [--width 512] [--repeats 3] [--json out.json]

One random-weight LLaVA-1.5-shaped model built here: CLIP 336 px with 14 px patches (576 visual tokens; a 2-layer,
64-wide tower, so the language model dominates), a Llama language model of `--layers` x `--width`. All three
engines run float32, eager (`enforce_eager=True`: the plugin runs its decoder layers eagerly, so the baseline does
too), without prefix caching or chunked prefill (PyramidDrop turns both off; the baseline gets the same, or repeated
prompts would hit its prefix cache). Reported per setting, as a ratio to no drop (min over repeats): time to first
token of 1 request, prefill throughput of 8 requests submitted together, decode throughput of 8 requests, beside the
language model's prefill FLOPs ratio (pyramiddrop.flops.prefill_flops; the vision tower is not counted). Before
timing, the greedy tokens of the PyramidDrop and FastV engines are compared with the transformers engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the tiny word-level tokenizer

NUM_VISUAL = 576
QUESTION_WORDS = 16
DECODE_TOKENS = 32


def build_model(directory: Path, layers: int, width: int) -> Path:
    import torch
    from tiny_processors import chat_template, word_tokenizer
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=128,
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=336, patch_size=14
    )
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=100, projector_hidden_act="gelu")
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights large enough that greedy tokens are not near-ties
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "vision_tower" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2 / width**0.5)
        model.lm_head.weight[100:] = 0
    model.save_pretrained(directory)
    tokenizer = word_tokenizer(["<image>"], {"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(
        images,
        tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    ).save_pretrained(directory)
    return directory


def prompts(count: int, offset: int = 0) -> list[dict]:
    from tiny_processors import images

    out = []
    for index in range(offset, offset + count):
        words = " ".join(f"w{4 + (index * 7 + j) % 80}" for j in range(QUESTION_WORDS))
        image = images([(336 + 8 * index, 300)], seed=index)[0]
        out.append({"prompt": f"user: <image> {words} assistant:", "multi_modal_data": {"image": image}})
    return out


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def timed(llm, requests: list[dict], max_tokens: int) -> float:
    start = time.perf_counter()
    llm.generate(requests, greedy(max_tokens), use_tqdm=False)
    return time.perf_counter() - start


def transformers_tokens(directory: Path, config, requests: list[dict], max_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pyramiddrop import apply_pyramid_drop

    processor = AutoProcessor.from_pretrained(directory)
    model = apply_pyramid_drop(LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32), config)
    out = []
    for request in requests:
        batch = processor(text=request["prompt"], images=[request["multi_modal_data"]["image"]], return_tensors="pt")
        generated = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
        out.append(generated[0, batch["input_ids"].shape[1] :].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM

    from pyramiddrop import PyramidDropConfig
    from pyramiddrop.budget import average_visual_fraction, fastv_schedule
    from pyramiddrop.flops import prefill_flops, tokens_per_layer

    pdrop = PyramidDropConfig.from_lambda(num_layers=args.layers, num_stages=4, lam=0.5)
    budget = average_visual_fraction(pdrop, args.layers, NUM_VISUAL)
    fastv = replace(fastv_schedule(budget, args.layers, NUM_VISUAL), method="fastv")
    settings = {"no drop": None, "pdrop lambda=0.5": pdrop, "fastv same budget": fastv}
    directory = build_model(Path(tempfile.mkdtemp(prefix="vllm-bench-")), args.layers, args.width)
    hf_config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    num_text = len(tokenizer(prompts(1)[0]["prompt"])["input_ids"]) - 1  # all but the one <image> placeholder
    options = dict(
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        max_num_batched_tokens=8 * 1024,
        max_num_seqs=8,
        seed=0,
    )
    engines = {}
    for name, config in settings.items():
        overrides = {"pyramid_drop": config.to_dict()} if config is not None else {}
        engines[name] = LLM(model=str(directory), hf_overrides=overrides, **options)

    check = prompts(4, offset=100)
    exact = {}
    for name, config in settings.items():
        if config is not None:
            got = [list(o.outputs[0].token_ids) for o in engines[name].generate(check, greedy(8), use_tqdm=False)]
            exact[name] = got == transformers_tokens(directory, config, check, 8)

    one, eight = prompts(1), prompts(8)
    runs = {name: {"ttft_1": [], "prefill_8": [], "generate_8": []} for name in settings}
    for name in settings:  # warm-up
        timed(engines[name], eight, 2)
    for _ in range(args.repeats):
        for name, llm in engines.items():
            runs[name]["ttft_1"].append(timed(llm, one, 1))
            runs[name]["prefill_8"].append(timed(llm, eight, 1))
            runs[name]["generate_8"].append(timed(llm, eight, DECODE_TOKENS + 1))

    prompt_tokens = 8 * (num_text + NUM_VISUAL)
    rows = {}
    for name, config in settings.items():
        ttft, prefill = min(runs[name]["ttft_1"]), min(runs[name]["prefill_8"])
        decode = min(g - p for g, p in zip(runs[name]["generate_8"], runs[name]["prefill_8"]))
        kept = tokens_per_layer(args.layers, NUM_VISUAL, config)
        rows[name] = {
            "ttft_1_s": ttft,
            "prefill_8_tokens_per_s": prompt_tokens / prefill,
            "decode_8_tokens_per_s": 8 * DECODE_TOKENS / decode,
            "prefill_flops": prefill_flops(hf_config, num_text, NUM_VISUAL, config),
            "kv_slots_written_per_stage": sorted({num_text + n for n in kept}, reverse=True),
            "kv_slots_allocated_per_layer": num_text + NUM_VISUAL,
            "tokens_equal_transformers": exact.get(name),
            "schedule": None if config is None else config.to_dict(),
            "raw": runs[name],
        }
    base = rows["no drop"]
    print(
        f"LLaVA-1.5 shape: {args.layers} layers x {args.width}, {NUM_VISUAL} visual + {num_text} text tokens; "
        f"min of {args.repeats} interleaved repeats; budget {budget:.4f} of the visual tokens per layer"
    )
    header = f"{'setting':20} {'FLOPs speed-up':>14} {'TTFT(1) speed-up':>17} {'prefill(8) speed-up':>20} "
    print(header + f"{'share of FLOPs':>15} {'decode(8) ratio':>16} {'exact':>6}  KV slots per stage")
    for name, row in rows.items():
        flops_speedup = base["prefill_flops"] / row["prefill_flops"]
        prefill_speedup = row["prefill_8_tokens_per_s"] / base["prefill_8_tokens_per_s"]
        row |= {
            "flops_speedup": flops_speedup,
            "ttft_1_speedup": base["ttft_1_s"] / row["ttft_1_s"],
            "prefill_8_speedup": prefill_speedup,
            "prefill_share_of_flops_prediction": prefill_speedup / flops_speedup,
            "decode_8_ratio": row["decode_8_tokens_per_s"] / base["decode_8_tokens_per_s"],
        }
        print(
            f"{name:20} {flops_speedup:14.3f} {row['ttft_1_speedup']:17.3f} {prefill_speedup:20.3f} "
            f"{row['prefill_share_of_flops_prediction']:15.3f} {row['decode_8_ratio']:16.3f} "
            f"{str(row['tokens_equal_transformers']):>6}  {row['kv_slots_written_per_stage']} of "
            f"{row['kv_slots_allocated_per_layer']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
