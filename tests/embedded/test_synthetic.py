"""The synthetic VQA generator, its answers, the tiny LLaVA's tokenizer / processor, and offline loading."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from pyramiddrop.synthetic.data import (
    ANSWERS,
    CELL,
    COLORS,
    QUESTION_TYPES,
    answer_question,
    build_prompt,
    chance_accuracy,
    export_jsonl,
    generate,
    make_example,
    make_split,
    normalize_answer,
    parse_question,
    score_answer,
    vocabulary,
)
from pyramiddrop.tools.inputs import load_jsonl


def _texts(examples):
    return [(e.question, e.answer, e.type) for e in examples]


def test_splits_are_deterministic_and_seeds_differ():
    first, second = make_split("test", 60), make_split("test", 60)
    assert _texts(first) == _texts(second)
    assert all(a.scene == b.scene for a, b in zip(first, second))
    for a, b in zip(first[:10], second[:10]):
        assert a.image().tobytes() == b.image().tobytes()
    assert len(make_split("validation")) == 500 and len(make_split("test")) == 1000
    assert _texts(make_split("validation", 60)) != _texts(first)
    fresh = generate(60, seed=12345)
    assert _texts(fresh) != _texts(first)
    assert first[0].image().tobytes() != fresh[0].image().tobytes()
    with pytest.raises(ValueError):
        make_split("train")


def test_answers_agree_with_metadata():
    for example in make_split("test") + make_split("validation"):
        assert answer_question(example.scene, example.question) == example.answer
        assert parse_question(example.question)["type"] == example.type


def test_scenes_are_unambiguous():
    for example in make_split("test", 300):
        objects = example.scene.objects
        assert 1 <= len(objects) <= 7
        assert len({(o.row, o.col) for o in objects}) == len(objects)
        assert len({(o.shape, o.color) for o in objects}) == len(objects)
        for o in objects:
            x0, y0, x1, y1 = o.bbox
            assert o.col * CELL < x0 and x1 < (o.col + 1) * CELL and o.row * CELL < y0 and y1 < (o.row + 1) * CELL


def test_rendered_pixels_match_metadata():
    for example in make_split("test", 100):
        image = example.image()
        assert image.size == (192, 192)
        assert image.getpixel((0, 0)) == example.scene.background
        for o in example.scene.objects:
            assert image.getpixel((o.cx, o.cy)) == COLORS[o.color]


def test_answers_are_balanced_within_each_type():
    examples = make_split("test")
    per_type = collections.Counter(e.type for e in examples)
    assert set(per_type) == set(QUESTION_TYPES) and len(set(per_type.values())) == 1
    for qtype in QUESTION_TYPES:
        counts = collections.Counter(e.answer for e in examples if e.type == qtype)
        assert set(counts) == set(ANSWERS[qtype])
        assert max(counts.values()) - min(counts.values()) <= 1
    assert chance_accuracy([e.type for e in examples]) == pytest.approx((1 / 6 + 1 / 3 + 1 / 2 + 1 / 5) / 4)


def test_scoring_normalises():
    assert score_answer(" Red.", "red") and score_answer("2", "two") and score_answer("yes it is", "yes")
    assert not score_answer("", "no") and normalize_answer("") == ""


def test_jsonl_export_round_trip(tmp_path):
    examples = make_split("test", 5)
    path = export_jsonl(examples, tmp_path, "test")
    records = load_jsonl(path)
    assert [(r["question"], r["answer"], r["type"]) for r in records] == _texts(examples)
    from PIL import Image

    with Image.open(records[0]["image"]) as image:
        assert image.convert("RGB").tobytes() == examples[0].image().tobytes()


def test_tokenizer_round_trips_vocabulary():
    from pyramiddrop.synthetic.model import build_tokenizer

    tokenizer = build_tokenizer()
    for word in vocabulary():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id
        assert tokenizer.decode(ids) == word
    for example in make_split("test", 50):
        ids = tokenizer(build_prompt(example.question) + " " + example.answer)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids[-1:]) == example.answer


def test_patch_targets_follow_objects():
    from pyramiddrop.synthetic.data import SHAPES
    from pyramiddrop.synthetic.patches import patch_targets

    example = make_split("test", 1)[0]
    targets = patch_targets(example.scene)
    assert targets.shape == (144, 5) and int(targets[:, 3].sum()) == len(example.scene.objects)
    for o in example.scene.objects:
        patch = (o.cy // 16) * 12 + o.cx // 16
        shape, color = SHAPES.index(o.shape), list(COLORS).index(o.color)
        assert targets[patch, :4].tolist() == [1 + shape, 1 + color, 1 + shape * len(COLORS) + color, 1]
        assert targets[patch, 4] == o.row * 3 + o.col  # every patch lies in one 64 px cell
    assert targets[:, 4].bincount().tolist() == [16] * 9
    background = targets[:, 0] == 0
    assert background.any() and (targets[background, :3] == 0).all()


def test_model_saves_loads_offline_and_generates(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyramiddrop.synthetic.model import NUM_VISUAL_TOKENS, build_model, directory_size_mb, predict, save

    model, processor = build_model(seed=0)
    text = model.config.text_config
    assert text.num_hidden_layers >= 8 and text.num_key_value_heads < text.num_attention_heads
    save(model, processor, tmp_path)
    assert directory_size_mb(tmp_path) < 25
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"

    examples = make_split("test", 3)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": examples[0].question}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == build_prompt(examples[0].question)
    inputs = processor(
        images=[e.image() for e in examples],
        text=[build_prompt(e.question) for e in examples],
        return_tensors="pt",
        padding=True,
    )
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    assert NUM_VISUAL_TOKENS == 144 == model.config.image_seq_length
    assert image_tokens.tolist() == [NUM_VISUAL_TOKENS] * 3
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        assert sum(f.shape[0] for f in features) == 3 * NUM_VISUAL_TOKENS
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape == (3, inputs["input_ids"].shape[1] + 3)
    assert len(predict(model, processor, examples, batch_size=2)) == 3


def test_curriculum_phases_parse_and_reject_bad_specs():
    from pyramiddrop.synthetic.vqa import Phase, curriculum_phases, phase_number

    phases = curriculum_phases("150:1-1:color,800:2-4", 1000)
    assert phases == [Phase(150, (1, 1), "color"), Phase(800, (2, 4)), Phase(50, (3, 6))]
    assert [phase_number(phases, step) for step in (1, 150, 151, 950, 951, 1000)] == [1, 1, 2, 2, 3, 3]
    for bad in ("150:1-1:colour", "0:1-2", "10:3-2", "10:1-12", "ten:1-2"):
        with pytest.raises(ValueError, match="STEPS:MIN-MAX"):
            curriculum_phases(bad, 1000)
    with pytest.raises(ValueError, match="raise --steps"):
        curriculum_phases("900:1-2,200:2-4", 1000)


def test_vqa_stream_follows_the_curriculum_step_by_step():
    """Sample i belongs to step i // batch_size; a one-type phase is single-turn and balanced over its answers."""
    from pyramiddrop.synthetic.model import build_processor
    from pyramiddrop.synthetic.vqa import VQADataset, curriculum_phases

    processor = build_processor()
    tokenizer = processor.tokenizer
    phases = curriculum_phases("3:1-1:color,2:2-2", 7)
    dataset = VQADataset(processor, phases, batch_size=4, turns=3, start=10)
    assert len(dataset) == 7 * 4
    assert [dataset.phase_of(i).scene_objects for i in (0, 11, 12, 19, 20, 27)] == [(1, 1)] * 2 + [(2, 2)] * 2 + [
        (3, 6)
    ] * 2
    with pytest.raises(IndexError):
        dataset[28]
    for index in range(len(ANSWERS["color"])):
        sample = dataset[index]
        answer = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
        assert tokenizer.decode(answer[:-1]) == ANSWERS["color"][(10 + index) % 6]  # each answer in turn
        assert answer[-1] == tokenizer.eos_token_id and len(answer) == 2  # one turn only
    sample = dataset[14]  # the 2-object phase: all types, three turns, the stream's index 24 (a colour question)
    assert sum(label == tokenizer.eos_token_id for label in sample["labels"]) == 3
    first = make_example(0, 24, (2, 2))
    assert first.type == "color" and len(first.scene.objects) == 2
    answers = tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100])
    assert answers.split()[0] == first.answer


def test_stage1_patch_head_reads_the_projector_output():
    """With the projector in stage 1, the per-patch loss trains it; without, it never sees the projector."""
    from pyramiddrop.synthetic.model import build_model
    from pyramiddrop.synthetic.patches import PatchDataset, PatchPretrainer

    model, processor = build_model(0, hidden_size=64, num_layers=2)
    batch = [PatchDataset(processor.image_processor, 2)[i] for i in range(2)]
    inputs = {key: torch.stack([sample[key] for sample in batch]) for key in batch[0]}
    projector = model.model.multi_modal_projector
    for aligned in (True, False):
        model.zero_grad()
        pretrainer = PatchPretrainer(
            model.model.vision_tower, projector if aligned else None, 64 if aligned else 128, row_col=False
        )
        pretrainer(**inputs)["loss"].backward()
        assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
        gradient = projector.linear_1.weight.grad
        assert (gradient is not None and gradient.abs().sum() > 0) == aligned
    # Row and column targets add two 3-way losses (weight 2): at the uniform start each is about log 3.
    pretrainer = PatchPretrainer(model.model.vision_tower, projector, 64, row_col=True)
    with torch.no_grad():
        pretrainer.row_col_head.weight.zero_()
        pretrainer.row_col_head.bias.zero_()
    base = PatchPretrainer(model.model.vision_tower, projector, 64, row_col=False)
    base.head.load_state_dict(pretrainer.head.state_dict())
    with torch.no_grad():
        difference = pretrainer(**inputs)["loss"] - base(**inputs)["loss"]
    assert difference.item() == pytest.approx(4 * math.log(3), rel=1e-5)


@pytest.mark.slow
def test_freeze_projector_keeps_the_projector_of_the_start(tmp_path):
    from pyramiddrop.synthetic.model import build_model, load
    from pyramiddrop.synthetic.train import main

    main(["--out", str(tmp_path), "--quick", "--freeze-projector", "--no-align-projector"])
    trained, _ = load(tmp_path)
    fresh, _ = build_model(0, init_std=128**-0.5)
    for name, weight in fresh.model.multi_modal_projector.state_dict().items():
        torch.testing.assert_close(trained.model.multi_modal_projector.state_dict()[name], weight)
    lm_weight = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(
        trained.model.language_model.state_dict()[lm_weight], fresh.model.language_model.state_dict()[lm_weight]
    )


def test_set_rope_theta_matches_a_model_built_with_that_base_and_survives_saving(tmp_path):
    from pyramiddrop.synthetic.model import build_model, encode, load, save, set_rope_theta

    changed, processor = build_model(seed=0)
    built, _ = build_model(seed=0, rope_theta=1e6)
    inputs = encode(processor, make_split("test", 2))
    with torch.no_grad():
        before = changed(**inputs).logits
        set_rope_theta(changed, 1e6)
        after, expected = changed(**inputs).logits, built(**inputs).logits
    assert not torch.allclose(before, after, atol=1e-4)  # the base is really used
    torch.testing.assert_close(after, expected)
    save(changed, processor, tmp_path)
    reloaded, _ = load(tmp_path)
    assert reloaded.config.text_config.rope_parameters["rope_theta"] == 1e6
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected)


@pytest.mark.slow
def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(tmp_path, capsys):
    """--stop-at leaves the state an interrupted run leaves; --resume continues it to the same weights, exactly."""
    from safetensors.torch import load_file

    from pyramiddrop.synthetic.train import main

    flags = ["--quick", "--vision-steps", "0", "--eval-size", "0", "--val-every", "10"]
    main(["--out", str(tmp_path / "whole"), *flags])
    assert main(["--out", str(tmp_path / "parts"), *flags, "--stop-at", "25"]) == {"stopped_at": 25}
    assert (tmp_path / "parts" / "checkpoints" / "checkpoint-25").is_dir()
    with pytest.raises(SystemExit):  # a second --out on the same directory would mix two runs
        main(["--out", str(tmp_path / "parts"), *flags])
    assert "already holds a run (run_args.json); continue it with --resume" in capsys.readouterr().err
    main(["--resume", str(tmp_path / "parts")])
    whole, parts = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    for name, weight in whole.items():
        assert torch.equal(weight, parts[name]), name
    fresh = load_file(tmp_path / "parts" / "stage1" / "model.safetensors")
    assert any(not torch.equal(fresh[name], weight) for name, weight in whole.items())  # it did train


def test_training_flags_that_cannot_work_are_refused_before_training(tmp_path, capsys):
    from pyramiddrop.synthetic.train import main

    for flags, message in [
        (["--rope-theta", "0"], "must be above 1"),
        (["--steps", "40", "--stop-at", "40"], "--stop-at 40: give a stage 2 step between 1 and --steps - 1 (39)"),
        (["--curriculum", "10:1-1:shapes"], "TYPE one of the shapes scenes' color, shape, exists, count"),
        (["--curriculum", "10:1-1:tint"], "TYPE one of the shapes scenes' color, shape, exists, count"),
        (
            ["--scenes", "cluttered", "--curriculum", "10:1-1:size"],
            "cluttered scenes' color, shape, exists, count, reading, tint",
        ),
        (["--projector-lr-scale", "0"], "--projector-lr-scale 0.0: give a positive scale"),
        (["--data-workers", "-1"], "--data-workers -1: give 0"),
        (["--steps", "10", "--curriculum", "20:1-1"], "raise --steps"),
    ]:
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "never"), *flags])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path / "nothing")])
    assert "no run_args.json there" in capsys.readouterr().err
