"""Train the tiny LLaVA from scratch on CPU, in two stages, with the Hugging Face Trainer.

1. Vision pre-training (`synthetic/patches.py`): the vision tower and the projector learn per-patch object
   attributes and positions, as CLIP pre-training gives a real LLaVA its visual features.
2. VQA (`synthetic/vqa.py`): the whole LLaVA (vision tower frozen by default) learns to answer 8 questions per
   image with the next-token loss on the answer tokens only, through a curriculum of scene sizes. Nothing in the
   recipe refers to particular decoder layers or to dropping; `--drop-lam` (PyramidDrop training, the paper's
   training mode) is the one option that drops, and it is off by default.

    pdrop train --out runs/synthetic --threads 2   # the plain recipe (the shipped model predates it: docs/synthetic.md)
    pdrop train --resume runs/synthetic            # continue an interrupted run from its last checkpoint
    pdrop train --out /tmp/smoke --quick           # a smoke test, under a minute
    pdrop train --out runs/cluttered --scenes cluttered --threads 2   # issue 34's scenes (256 tokens, 6 types)

Images are rendered on the fly from `(seed, index)`, so nothing big is stored. The output directory gets the
model and processor (loadable with the Auto classes), `run_args.json`, `loss_curve.csv`, `metrics.json`,
`stage1/` (the model after stage 1) and `checkpoints/` (the last stage 2 checkpoint, for `--resume`).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop
from pyramiddrop.scoring import SCORERS
from pyramiddrop.synthetic.data import DEFAULT_SCENES
from pyramiddrop.synthetic.model import build_model, load, save, scenes_of
from pyramiddrop.synthetic.patches import PatchDataset, PatchPretrainer, evaluate_patches
from pyramiddrop.synthetic.scene import SCENE_SETS
from pyramiddrop.synthetic.validation import ValidationCallback, evaluate
from pyramiddrop.synthetic.vqa import VQADataset, collate_vqa, curriculum_phases, phase_number

RUN_ARGS = "run_args.json"
# flags that describe how this invocation runs, not what the run is: --resume takes them from its own command line
INVOCATION_FLAGS = ("resume", "threads", "stop_at")


def training_arguments(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    logging_steps: int,
    warmup_steps: int,
    save_steps: int = 0,
    data_workers: int = 0,
) -> TrainingArguments:
    """Cosine schedule after a short warm-up; data in stream order (the stream is random by construction, and the
    curriculum lives in its order); with `save_steps`, a checkpoint to resume from every that many steps."""
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        dataloader_num_workers=data_workers,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        disable_tqdm=False,
    )


class ProjectorScaledTrainer(Trainer):
    """The Trainer with the projector's learning rate multiplied by `projector_lr_scale` (its own param groups)."""

    def __init__(self, *args, projector_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr_scale = projector_lr_scale

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.projector_lr_scale == 1.0:
            return optimizer
        projector = {id(p) for p in self.model.model.multi_modal_projector.parameters()}
        groups = []
        for group in optimizer.param_groups:
            groups.append({**group, "params": [p for p in group["params"] if id(p) not in projector]})
            scaled = [p for p in group["params"] if id(p) in projector]
            if scaled:
                groups.append({**group, "params": scaled, "lr": group["lr"] * self.projector_lr_scale})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer


CLUTTERED_CURRICULUM = "150:1-1:color,150:1-1:reading,150:1-1:tint,1500:2-4"
CURRICULA = {  # the default curriculum of each scene set: one type on one object first, then small scenes
    "shapes": "150:1-1:color,1500:2-4",
    "cluttered": CLUTTERED_CURRICULUM,
    "cluttered-144": CLUTTERED_CURRICULUM,
}


class StopAt(TrainerCallback):
    """Stop after stage 2 step `step` with a checkpoint, as an interrupted run would leave it (`--stop-at`)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdrop train", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="output directory (model, processor, logs, checkpoints)")
    where.add_argument("--resume", type=Path, help="continue the run in this directory from its last checkpoint")
    parser.add_argument(
        "--scenes",
        default=DEFAULT_SCENES,
        choices=sorted(SCENE_SETS),
        help="scene set to train on: shapes (the shipped model's, 144 tokens), cluttered (256 tokens, 6 types) or "
        "cluttered-144 (the cluttered scenes at 192 px, 144 tokens)",
    )
    parser.add_argument("--vision-steps", type=int, default=1000, help="stage 1 steps (per-patch pre-training)")
    parser.add_argument("--vision-batch-size", type=int, default=32, help="stage 1 batch size")
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=5000, help="stage 2 steps (VQA)")
    parser.add_argument("--batch-size", type=int, default=16, help="stage 2 batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="stage 2 peak learning rate (cosine decay)")
    parser.add_argument("--warmup-steps", type=int, default=50, help="stage 2 linear warm-up")
    parser.add_argument("--turns", type=int, default=8, help="questions per training image (multi-turn)")
    parser.add_argument(
        "--curriculum",
        help="stage 2 phases before full 3-6 object scenes: STEPS:MIN-MAX objects[:one question type], "
        f"comma-separated (default: {CURRICULA})",
    )
    parser.add_argument("--train-vision", action="store_true", help="also update the vision tower in stage 2")
    parser.add_argument(
        "--freeze-projector",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep the projector as stage 1 left it (trained in VQA, it squashes the patches' positions out)",
    )
    parser.add_argument(
        "--projector-lr-scale",
        type=float,
        default=1.0,
        help="stage 2 learning rate of the projector relative to --lr (0 < scale; 1: the same)",
    )
    parser.add_argument(
        "--data-workers",
        type=int,
        default=0,
        help="stage 2 processes rendering images while the model trains (the data are the same for any number)",
    )
    parser.add_argument(
        "--align-projector",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the projector in stage 1 too (the head reads its output)",
    )
    parser.add_argument(
        "--row-col-targets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stage 1 also predicts each patch's grid row and column",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help="language model width")
    parser.add_argument("--layers", type=int, default=8, help="language model decoder layers")
    parser.add_argument("--rope-theta", type=float, default=1e8, help="language model RoPE base of a new model")
    parser.add_argument(
        "--init-std",
        type=float,
        help="std of the language model's initial weights (default: width**-0.5; HF's 0.02 is made for wide models)",
    )
    parser.add_argument("--init", type=Path, help="start from a saved model directory instead of from scratch")
    parser.add_argument("--data-start", type=int, default=0, help="first stage 2 index of the training stream")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--eval-size", type=int, default=500, help="validation examples scored at the end")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument(
        "--val-every", type=int, default=250, help="stage 2 steps between validation scores, saves and checkpoints"
    )
    parser.add_argument("--stop-at", type=int, help="stop after this stage 2 step, leaving a checkpoint for --resume")
    parser.add_argument(
        "--drop-lam", type=float, help="train stage 2 with PyramidDrop: keep lam**s of the visual tokens in stage s"
    )
    parser.add_argument("--drop-stages", type=int, default=4, help="PyramidDrop stages with --drop-lam")
    parser.add_argument(
        "--drop-method", default="pdrop", choices=sorted(SCORERS), help="how --drop-lam ranks the visual tokens"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 30 + 40 steps of batch 8, 50 eval")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:  # the run's own arguments, and this command line's invocation flags
        saved = args.resume / RUN_ARGS
        if not saved.exists():
            parser.error(f"--resume {args.resume}: no {RUN_ARGS} there; give the --out directory of a pdrop train run")
        # a run saved before a flag existed gets that flag's default
        run = vars(parser.parse_args(["--out", str(args.resume)])) | json.loads(saved.read_text())
        for key in INVOCATION_FLAGS:
            run[key] = getattr(args, key)
        args = argparse.Namespace(**run)
        args.out = args.resume
        args.init = Path(args.init) if args.init else None
    else:
        args.out = Path(args.out)
        if (args.out / RUN_ARGS).exists():  # its stage 1 and checkpoints would be picked up under other flags
            parser.error(
                f"--out {args.out} already holds a run ({RUN_ARGS}); continue it with --resume {args.out}, "
                "or give a new --out directory"
            )
    if args.curriculum is None:
        args.curriculum = CURRICULA[args.scenes]
    if not args.projector_lr_scale > 0:
        parser.error(
            f"--projector-lr-scale {args.projector_lr_scale}: give a positive scale (--freeze-projector "
            "keeps the projector fixed)"
        )
    if args.data_workers < 0:
        parser.error(f"--data-workers {args.data_workers}: give 0 (render in the training process) or more")
    if args.init is not None and scenes_of(args.init) != args.scenes:
        parser.error(
            f"--init {args.init} was trained on {scenes_of(args.init)} scenes, not {args.scenes}: "
            f"pass --scenes {scenes_of(args.init)} or start from scratch"
        )
    if args.quick:
        args.vision_steps, args.steps, args.eval_size, args.logging_steps = 30, 40, 50, 5
        args.batch_size = args.vision_batch_size = 8
        args.curriculum, args.turns, args.warmup_steps = "10:1-2,10:2-4", min(args.turns, 2), 5
        args.val_every = min(args.val_every, 20)
    if args.rope_theta <= 1:
        parser.error(f"--rope-theta {args.rope_theta}: the RoPE base must be above 1 (Llama's default is 10000)")
    if args.stop_at is not None and not 0 < args.stop_at < args.steps:
        parser.error(f"--stop-at {args.stop_at}: give a stage 2 step between 1 and --steps - 1 ({args.steps - 1})")
    if args.init_std is None:
        # At width 128, HF's default 0.02 makes every attention logit ~0.05 at the start, and the query/key
        # weights grow slowly from that saddle; unit-variance projections (std = width**-0.5) learn much faster.
        args.init_std = args.hidden_size**-0.5
    try:
        args.phases = curriculum_phases(args.curriculum, args.steps, args.scenes)
    except ValueError as error:
        parser.error(str(error))
    return args


def run_stage1(model, processor, args) -> tuple[list[dict], dict]:
    projector = model.model.multi_modal_projector if args.align_projector else None
    width = model.config.text_config.hidden_size if projector else model.config.vision_config.hidden_size
    pretrainer = PatchPretrainer(model.model.vision_tower, projector, width, args.row_col_targets, args.scenes)
    arguments = training_arguments(
        args.out / "stage1-trainer",
        args.vision_steps,
        args.vision_batch_size,
        args.vision_lr,
        args.seed,
        args.logging_steps,
        warmup_steps=max(1, args.vision_steps // 20),
    )
    dataset = PatchDataset(processor.image_processor, args.vision_steps * args.vision_batch_size, scenes=args.scenes)
    trainer = Trainer(model=pretrainer, args=arguments, train_dataset=dataset)
    trainer.train()
    shutil.rmtree(args.out / "stage1-trainer", ignore_errors=True)
    curve = [{"stage": "vision"} | entry for entry in trainer.state.log_history if "loss" in entry]
    return curve, evaluate_patches(pretrainer, processor.image_processor, 200)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "phases"}
    if args.resume is None:
        (args.out / RUN_ARGS).write_text(json.dumps(record, indent=2) + "\n")
    set_seed(args.seed)
    started = time.time()
    stage1_dir = args.out / "stage1"
    checkpoints = args.out / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if (stage1_dir / "config.json").exists():  # resumed: stage 1 is done
        # The Trainer restores the optimizer, schedule, RNG and stream position from `last`, but its own weight
        # loading is a silent no-op here: save_pretrained writes LLaVA's legacy key names, and the Trainer loads
        # them with a non-strict load_state_dict that matches none. from_pretrained converts the names.
        model, processor = load(stage1_dir)
        if last:
            model = AutoModelForImageTextToText.from_pretrained(last)
        stage1 = json.loads((stage1_dir / "stage1.json").read_text())
    else:
        if args.init:
            model, processor = load(args.init)
        else:
            model, processor = build_model(
                args.seed, args.hidden_size, args.layers, args.init_std, args.rope_theta, args.scenes
            )
        model.train()
        curve, patch_metrics = run_stage1(model, processor, args) if args.vision_steps > 0 else ([], {})
        if patch_metrics:
            print("patch metrics:", json.dumps(patch_metrics))
        stage1 = {"curve": curve, "patch_metrics": patch_metrics, "seconds": round(time.time() - started, 1)}
        save(model, processor, stage1_dir)
        (stage1_dir / "stage1.json").write_text(json.dumps(stage1, indent=2) + "\n")

    num_layers = model.config.get_text_config().num_hidden_layers
    if args.drop_lam is not None:  # PyramidDrop training: every step drops, and the model is saved with it
        drop_config = PyramidDropConfig.from_lambda(
            num_layers, args.drop_stages, args.drop_lam, method=args.drop_method
        )
        drop_config.validate_for(num_layers)
        apply_pyramid_drop(model, drop_config)
    model.train()
    model.model.vision_tower.requires_grad_(args.train_vision)
    model.model.multi_modal_projector.requires_grad_(not args.freeze_projector)
    for number, phase in enumerate(args.phases):
        kind = phase.question_type or "all types"
        low, high = phase.scene_objects
        print(f"VQA phase {number + 1}/{len(args.phases)}: {phase.steps} steps, {low}-{high} objects, {kind}")
    callbacks = [ValidationCallback(model, processor, args.val_every, save_to=args.out)]
    if args.stop_at is not None:
        callbacks.append(StopAt(args.stop_at))
    stage2_seconds, curve = 0.0, list(stage1["curve"])
    if args.steps > 0:
        trainer = ProjectorScaledTrainer(
            model=model,
            projector_lr_scale=args.projector_lr_scale,
            args=training_arguments(
                checkpoints,
                args.steps,
                args.batch_size,
                args.lr,
                args.seed,
                args.logging_steps,
                warmup_steps=args.warmup_steps,
                save_steps=args.val_every,
                data_workers=args.data_workers,
            ),
            train_dataset=VQADataset(
                processor, args.phases, args.batch_size, turns=args.turns, start=args.data_start, scenes=args.scenes
            ),
            data_collator=collate_vqa(processor.tokenizer.pad_token_id),
            callbacks=callbacks,
        )
        if last:
            print(f"resuming from {last}")
        stage2_seconds = trainer.train(resume_from_checkpoint=last).metrics["train_runtime"]
        curve += [
            {"stage": f"vqa{phase_number(args.phases, entry['step'])}"} | entry
            for entry in trainer.state.log_history
            if "loss" in entry or "val_accuracy" in entry
        ]
        if trainer.state.global_step < args.steps:
            print(f"stopped at step {trainer.state.global_step} of {args.steps}: continue with --resume {args.out}")
            return {"stopped_at": trainer.state.global_step}

    model.requires_grad_(True)
    save(model, processor, args.out)
    metrics = evaluate(model, processor, args.eval_size) if args.eval_size else {}
    metrics |= {
        "patch_metrics": stage1["patch_metrics"],
        "vision_train_seconds": stage1["seconds"],
        "vqa_seconds_per_step": round(stage2_seconds / max(1, args.steps), 4),
        "pyramid_drop": model.config.to_dict().get("pyramid_drop"),
        "seconds_last_invocation": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "args": record,
    }
    with (args.out / "loss_curve.csv").open("w", newline="") as handle:
        fields = ["stage", "step", "loss", "val_accuracy", "learning_rate", "grad_norm", "epoch"]
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(curve)
    metrics["model_mb"] = round(sum(p.stat().st_size for p in args.out.iterdir() if p.is_file()) / 2**20, 2)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = ("accuracy", "noise_accuracy", "chance", "seconds_last_invocation", "model_mb")
    print(json.dumps({key: metrics.get(key) for key in summary}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
