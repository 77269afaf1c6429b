"""Run by tests/training/test_distributed.py: a few SGD steps on a tiny PyramidDrop LLaVA, alone or under one of the
distributed wrappers (gloo, CPU): DDP, accelerate's DDP, accelerate's FSDP1 / FSDP2, DeepSpeed ZeRO-2 / ZeRO-3.

    python dist_worker.py OUT.json [--mode MODE]    # MODE: single (default), ddp, accelerate, fsdp1-layer, ...
"""

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from tiny_models import IMAGE_TOKEN_ID, pad, tiny_llava

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop

TIMEOUT = timedelta(seconds=120)  # a rank that never arrives fails the test instead of hanging it
# accelerate's policy names. Its transformer-based default wraps `model._no_split_modules`, which for LLaVA with a
# CLIP tower names CLIPTextEmbeddings, absent from the model ("Could not find the transformer layer class"): the
# layer classes are given, as `--fsdp_transformer_layer_cls_to_wrap` does.
FSDP_WRAPS = {"layer": "transformer_based_wrap", "root": "no_wrap"}
LAYER_CLASSES = ["LlamaDecoderLayer", "CLIPEncoderLayer"]


def global_batch():
    """Four samples of different lengths, each with exactly two answer tokens (equal loss weight per rank)."""
    generator = torch.Generator().manual_seed(0)
    rows, labels_rows = [], []
    for prefix in (1, 3, 2, 4):
        text = torch.randint(2, IMAGE_TOKEN_ID, (prefix + 4,), generator=generator).tolist()
        row = [1] + text[:prefix] + [IMAGE_TOKEN_ID] * 64 + text[prefix:]
        rows.append(row)
        labels_rows.append([-100] * (len(row) - 2) + row[-2:])
    input_ids, attention_mask = pad(rows, "right")
    labels, _ = pad(labels_rows, "right")
    labels = labels.masked_fill(attention_mask == 0, -100)
    pixel_values = torch.randn(4, 3, 56, 56, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}


def accelerate_fsdp(model, optimizer_class, version: int, wrap: str):
    """FSDP as accelerate sets it up (its plugin's defaults and wrap policy), on CPU processes with gloo.

    accelerate 1.15 enables FSDP only for accelerator devices: with CPU processes (`Accelerator(cpu=True)` or
    `accelerate launch --use_fsdp` without GPUs) it silently falls back to DDP (asserted below). The state is
    switched to FSDP after construction, so `prepare` takes its FSDP path with the gloo group it made. FSDP2: that
    path as is (`fully_shard` per wrapped layer, then the root). FSDP1: accelerate passes `device_id=cpu`, which
    FSDP1 rejects on CPU ("Inconsistent compute device and `device_id`: cpu vs cpu:0"), so the model is wrapped
    here with the arguments accelerate passes except that one, and handed to `prepare` already wrapped.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
    from accelerate.utils import DistributedType

    layers = LAYER_CLASSES if wrap == "layer" else None
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version, auto_wrap_policy=FSDP_WRAPS[wrap], transformer_cls_names_to_wrap=layers
    )
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT)])
    assert accelerator.distributed_type == DistributedType.MULTI_CPU  # what accelerate picks by itself on CPU
    accelerator.state.distributed_type, accelerator.state.fsdp_plugin = DistributedType.FSDP, plugin
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        plugin.set_auto_wrap_policy(model)
        model = FullyShardedDataParallel(
            model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            auto_wrap_policy=plugin.auto_wrap_policy,
            use_orig_params=plugin.use_orig_params,
            sync_module_states=plugin.sync_module_states,
            backward_prefetch=plugin.backward_prefetch,
            forward_prefetch=plugin.forward_prefetch,
            limit_all_gathers=plugin.limit_all_gathers,
        )
    wrapped, optimizer = accelerator.prepare(model, optimizer_class(model.parameters()))
    return accelerator, wrapped, optimizer


def deepspeed_engine(model, optimizer_class, stage: int):
    """`deepspeed.initialize` on DeepSpeed's CPU accelerator with gloo.

    Its CPU backend JIT-compiles a shared-memory allreduce op on first use (about 45 s, and it needs a C++
    compiler); the test leaves it out, so every collective goes through gloo and the test depends on no compiler.
    """
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 (the attribute `deepspeed.comm.torch` is the torch package itself)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", timeout=TIMEOUT)
    parameters = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 4 // dist.get_world_size(),
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # plain SGD, as in the other modes
        "gradient_clipping": 0.0,  # deepspeed.initialize clips at 1.0 unless told otherwise
    }
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer_class(parameters), config=config, model_parameters=parameters
    )
    return engine, optimizer


def full_weights(model, wrapped, mode: str) -> dict[str, float]:
    """Every parameter's sum, gathered from the shards, by its name in the unwrapped model (collective)."""
    if mode.startswith("fsdp"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: value.double().sum().item() for name, value in state.items()}
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {name: p.detach().double().sum().item() for name, p in model.named_parameters()}
    return {name: p.detach().double().sum().item() for name, p in model.named_parameters()}


def fsdp_units(wrapped) -> list[str]:
    """Class names of the modules FSDP shards as one unit each (FSDP1 wrappers' inner modules, FSDP2 modules)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    units = [m for m in wrapped.modules() if isinstance(m, (FullyShardedDataParallel, FSDPModule))]
    return sorted({type(m.module if isinstance(m, FullyShardedDataParallel) else m).__name__ for m in units})


def main(out_path: str, mode: str) -> None:
    model = apply_pyramid_drop(tiny_llava().train(), PyramidDropConfig([2, 4], [0.5, 0.25]))
    model.model.vision_tower.requires_grad_(False)  # as in LLaVA training (its last layer is unused anyway)

    def optimizer_class(parameters):
        return torch.optim.SGD([p for p in parameters if p.requires_grad], lr=0.1)

    accelerator, distributed, rank, world = None, mode != "single", 0, 1
    if mode == "accelerate":
        from accelerate import Accelerator, InitProcessGroupKwargs

        accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT)])
        wrapped, optimizer = accelerator.prepare(model, optimizer_class(model.parameters()))
    elif mode.startswith("fsdp"):
        version, wrap = mode.removeprefix("fsdp").split("-")
        accelerator, wrapped, optimizer = accelerate_fsdp(model, optimizer_class, int(version), wrap)
    elif mode.startswith("zero"):
        wrapped, optimizer = deepspeed_engine(model, optimizer_class, int(mode.removeprefix("zero")))
    elif mode == "ddp":
        dist.init_process_group("gloo", timeout=TIMEOUT)
        wrapped, optimizer = torch.nn.parallel.DistributedDataParallel(model), optimizer_class(model.parameters())
    else:
        wrapped, optimizer = model, optimizer_class(model.parameters())
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()

    batch = global_batch()
    share = len(batch["input_ids"]) // world
    local = {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}
    losses = []
    for _ in range(3):
        loss = wrapped(**local).loss
        if mode.startswith("zero"):
            wrapped.backward(loss)
            wrapped.step()  # the optimizer step and zero_grad
        else:
            optimizer.zero_grad()
            accelerator.backward(loss) if accelerator else loss.backward()
            optimizer.step()
        reported = loss.detach().clone()
        if distributed:
            dist.all_reduce(reported)
            reported /= world
        losses.append(reported.item())
    weights = full_weights(model, wrapped, mode)
    if rank == 0:
        result = {"losses": losses, "weights": weights, "wrapper": type(wrapped).__name__, "world": world}
        with open(out_path, "w") as handle:
            json.dump(result | {"fsdp_units": fsdp_units(wrapped)}, handle)
    if distributed:
        dist.barrier()
        # Gloo's teardown of the DDP reducer sometimes hangs when main()'s locals are freed (seen on torch 2.13,
        # about one run in three): every rank is done and rank 0 has written its results, so leave without
        # running destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", default="single")
    arguments = parser.parse_args()
    main(arguments.out, arguments.mode)
