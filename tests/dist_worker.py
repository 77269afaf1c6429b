"""Run by tests/test_distributed.py: a few SGD steps on a tiny PyramidDrop LLaVA, alone or under DDP (gloo)."""

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from tiny_models import IMAGE_TOKEN_ID, pad, tiny_llava

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop


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


def main(out_path: str, use_accelerate: bool = False) -> None:
    """Raw DDP under torchrun, or the same steps through `accelerate.Accelerator` under `accelerate launch`.

    Process groups time out after 120 s: a rank that never arrives fails the test instead of hanging it.
    """
    model = apply_pyramid_drop(tiny_llava().train(), PyramidDropConfig([2, 4], [0.5, 0.25]))
    model.model.vision_tower.requires_grad_(False)  # as in LLaVA training (its last layer is unused anyway)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = None
    if use_accelerate:
        from accelerate import Accelerator, InitProcessGroupKwargs

        accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        rank, world, distributed = accelerator.process_index, accelerator.num_processes, accelerator.num_processes > 1
    else:
        distributed = "RANK" in os.environ
        rank, world = 0, 1
        if distributed:
            dist.init_process_group("gloo", timeout=timedelta(seconds=120))
            rank, world = dist.get_rank(), dist.get_world_size()
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    batch = global_batch()
    share = len(batch["input_ids"]) // world
    local = {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = wrapped(**local).loss
        accelerator.backward(loss) if accelerator else loss.backward()
        optimizer.step()
        reported = loss.detach().clone()
        if distributed:
            dist.all_reduce(reported)
            reported /= world
        losses.append(reported.item())
    if rank == 0:
        weights = {name: p.detach().double().sum().item() for name, p in model.named_parameters()}
        with open(out_path, "w") as handle:
            json.dump({"losses": losses, "weights": weights}, handle)
    if distributed:
        dist.barrier()
        # Gloo's teardown of the DDP reducer sometimes hangs when main()'s locals are freed (seen on torch 2.13,
        # about one run in three): every rank is done and rank 0 has written its results, so leave without
        # running destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], use_accelerate="--accelerate" in sys.argv[2:])
