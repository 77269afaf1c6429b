"""Training semantics: answer-span queries, gathered labels, gradients, gradient checkpointing, Trainer."""

import copy

import torch
from tiny_models import IMAGE_TOKEN_ID, llava_batch, multi_turn_batch, tiny_llava

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.scoring import SCORERS, register_scorer

PDROP = PyramidDropConfig(layer_list=[2, 4], image_token_ratio_list=[0.5, 0.25])


def test_training_queries_are_the_tokens_before_each_answer_span():
    seen = {}

    @register_scorer("capture_queries_for_tests")
    def capture(inputs):
        seen.setdefault("query_mask", inputs.query_mask.clone())
        return SCORERS["pdrop"](inputs)

    model = apply_pyramid_drop(tiny_llava().train(), PyramidDropConfig([2], [0.5], method="capture_queries_for_tests"))
    batch, answers = multi_turn_batch()
    model(**batch)
    for row, spans in enumerate(answers):
        assert torch.nonzero(seen["query_mask"][row]).flatten().tolist() == [start - 1 for start, _ in spans]
    counts = [len(kept) for kept in get_drop_record(model).kept_visual_indices[2]]
    assert counts == [64, 64]  # no answer span: not dropped
    assert [len(k[1]) for k in get_drop_record(model).kept_visual_indices[:2]] == [32, 32]


def test_an_answer_right_after_the_image_keeps_its_visual_query_at_every_stage():
    """The query (the token before the answer) is then the last visual token: it is never dropped, so every stage
    still ranks (without this the first drop could remove it and the later stages would keep everything)."""
    model = apply_pyramid_drop(tiny_llava().train(), PyramidDropConfig([2, 4], [0.5, 0.25]))
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * 64 + [7, 8, 9]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 56, 56), labels=labels)
    kept = get_drop_record(model).kept_visual_indices[0]
    assert [len(stage) for stage in kept] == [64, 32, 16]
    assert all(63 in stage.tolist() for stage in kept)


def test_training_loss_equals_manual_loss_on_the_gathered_sequence():
    model = apply_pyramid_drop(tiny_llava().train(), PDROP)
    batch, _ = multi_turn_batch()
    out = model(**batch)
    source = get_drop_record(model).kept_positions
    gathered = batch["labels"].gather(1, source.clamp(min=0)).masked_fill(source < 0, -100)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), gathered[:, 1:].flatten())
    assert torch.allclose(out.loss, manual, atol=1e-6)
    # Every answer token is still supervised, by the same predecessor token as before the drop.
    assert int((gathered != -100).sum()) == int((batch["labels"] != -100).sum())


def test_gradients_reach_kept_tokens_and_none_of_the_dropped():
    model = apply_pyramid_drop(tiny_llava().train(), PyramidDropConfig([2], [0.25]))
    captured = {}

    def keep_grad(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    model.model.language_model.layers[1].register_forward_hook(keep_grad)  # the hidden states entering the drop
    batch, _ = multi_turn_batch()
    model(**batch).loss.backward()
    grad = captured["hidden"].grad.abs().sum(-1)  # [B, L] before the drop
    record = get_drop_record(model)
    for row in range(2):
        kept_positions = set(record.kept_positions[row][record.kept_positions[row] >= 0].tolist())
        valid = batch["attention_mask"][row].bool()
        last_target = int(torch.nonzero(batch["labels"][row] != -100).max())
        for position in range(last_target):  # tokens at or after the last target cannot affect the loss
            if position in kept_positions:
                assert grad[row, position] > 0, position
            else:
                assert grad[row, position] == 0, position
        assert len(kept_positions) < int(valid.sum())  # something was dropped


def test_gradient_checkpointing_gives_the_same_gradients():
    base = apply_pyramid_drop(tiny_llava().train(), PDROP)
    checkpointed = copy.deepcopy(base)
    apply_pyramid_drop(checkpointed, PDROP)
    checkpointed.activation_checkpointing_enable()
    batch, _ = multi_turn_batch()
    losses = []
    for model in (base, checkpointed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, p), (_, q) in zip(base.named_parameters(), checkpointed.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_one_trainer_step_runs_and_saves_the_config(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = apply_pyramid_drop(tiny_llava(), PDROP)
    batch, _ = multi_turn_batch()
    rows = [{key: value[index] for key, value in batch.items()} for index in range(3)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        learning_rate=1e-3,
        logging_steps=1,
    )
    before = model.lm_head.weight.detach().clone()
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.lm_head.weight)
    checkpoint = next(tmp_path.glob("checkpoint-*"))
    assert '"pyramid_drop"' in (checkpoint / "config.json").read_text()


def test_eval_mode_with_labels_ranks_with_the_last_token():
    model = apply_pyramid_drop(tiny_llava().eval(), PDROP)
    batch = llava_batch([(2, 1, 3)])
    with torch.no_grad():
        model(**batch)
        plain = get_drop_record(model).kept_visual_indices[0]
        model(**batch, labels=batch["input_ids"])
    assert all(torch.equal(a, b) for a, b in zip(plain, get_drop_record(model).kept_visual_indices[0]))


def test_pdrop_train_runs_the_recipe_with_pyramid_drop_and_saves_it(tmp_path, capsys):
    import csv
    import json

    from pyramiddrop.cli import main
    from pyramiddrop.synthetic.model import load

    out = tmp_path / "run"
    recipe = [
        "--vision-steps",
        "2",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--vision-batch-size",
        "2",
        "--turns",
        "2",
        "--eval-size",
        "5",
    ]
    main(
        [
            "train",
            "--out",
            str(out),
            *recipe,
            "--val-every",
            "2",
            "--curriculum",
            "1:1-2",
            "--logging-steps",
            "1",
            "--drop-lam",
            "0.5",
            "--threads",
            "1",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pyramid_drop"]["layer_list"] == [2, 4, 6]
    assert metrics["vqa_seconds_per_step"] > 0 and metrics["accuracy"]["overall"] >= 0
    model, _ = load(out)  # offline, through the Auto classes; the schedule travels in the config
    assert model.config.pyramid_drop["image_token_ratio_list"] == [0.5, 0.25, 0.125]
    with (out / "loss_curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["stage"] for row in rows} == {"vision", "vqa1", "vqa2"}  # curriculum phase, then full scenes
    assert any(row["val_accuracy"] for row in rows)  # the validation callback logged at step 2 of phase 2
    assert "validation" in capsys.readouterr().out


def test_training_under_bf16_autocast_ranks_and_drops():
    """The Trainer's and TRL's bf16 mixed precision: the ranking's float32 attention logits are not autocast."""
    model = apply_pyramid_drop(tiny_llava().train(), PDROP)
    batch, _ = multi_turn_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert [len(kept) for kept in get_drop_record(model).kept_visual_indices[0]] == [64, 32, 16]
