"""Issue 34's cluttered scene set: textured backgrounds, digit glyphs, the reading and tint types, the CLS target,
the background-similarity statistic, and a model and training run on them."""

from __future__ import annotations

import collections
import itertools
import json

import numpy as np
import pytest
import torch

from pyramiddrop.synthetic.data import (
    ANSWERS,
    answer_question,
    chance_accuracy,
    extra_questions,
    generate,
    make_split,
)
from pyramiddrop.synthetic.scene import (
    COLORS,
    DIGITS,
    GLYPH_COLOR,
    GLYPH_SCALE,
    HUES,
    PATCH,
    object_mask,
    scene_set,
    surround_box,
    surround_hue,
)

SPEC = scene_set("cluttered")


@pytest.fixture(scope="module")
def test_split():
    return make_split("test", 300, scenes="cluttered")


@pytest.fixture(scope="module", params=["cluttered", "cluttered-144"])
def any_cluttered_split(request):
    """The test split of each cluttered scene set (256 and 144 visual tokens)."""
    return request.param, make_split("test", 300, scenes=request.param)


def test_cluttered_splits_are_deterministic_balanced_and_answered_by_their_metadata(any_cluttered_split):
    name, test_split = any_cluttered_split
    size = scene_set(name).image_size
    again = make_split("test", 300, scenes=name)
    assert [(e.question, e.answer, e.scene) for e in test_split] == [(e.question, e.answer, e.scene) for e in again]
    assert test_split[0].image().tobytes() == again[0].image().tobytes()
    assert [e.question for e in make_split("test", 30)] != [e.question for e in test_split[:30]]  # own stream
    per_type = collections.Counter(e.type for e in test_split)
    assert set(per_type) == set(SPEC.question_types) and set(per_type.values()) == {50}
    for qtype in SPEC.question_types:
        answers = collections.Counter(e.answer for e in test_split if e.type == qtype)
        assert set(answers) == set(ANSWERS[qtype]) and max(answers.values()) - min(answers.values()) <= 1
    for example in test_split:
        assert answer_question(example.scene, example.question) == example.answer
        assert example.image().size == (size, size)
        assert len(example.scene.regions) >= (12 if example.type != "tint" else 2)  # tint clears around its object
    chance = chance_accuracy([e.type for e in test_split])
    assert chance == pytest.approx((1 / 6 + 1 / 3 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 6) / 6)


def test_each_scene_set_has_its_geometry_and_a_default_curriculum():
    from pyramiddrop.synthetic.scene import SCENE_SETS
    from pyramiddrop.synthetic.train import CURRICULA

    assert {name: spec.visual_tokens for name, spec in SCENE_SETS.items()} == {
        "shapes": 144,
        "cluttered": 256,
        "cluttered-144": 144,
    }
    assert scene_set("cluttered-144").question_types == SPEC.question_types
    assert set(CURRICULA) == set(SCENE_SETS)  # `pdrop train --scenes NAME` needs one for each


def test_background_is_not_flat_and_marks_are_no_object_colour(any_cluttered_split):
    _, test_split = any_cluttered_split
    for example in test_split[:20]:
        pixels = np.array(example.image()).reshape(-1, 3)
        background = pixels[np.array(object_mask(example.scene)).reshape(-1) == 0]
        assert len(np.unique(background, axis=0)) > 50  # textures, shading and marks, not one shade
        for mark in example.scene.marks:
            assert 90 <= mark.grey <= 185 and (mark.grey,) * 3 not in COLORS.values()


def test_every_object_carries_its_digit_inside_one_patch_on_the_object(any_cluttered_split):
    from pyramiddrop.synthetic.patches import patch_targets

    name, test_split = any_cluttered_split
    side = scene_set(name).image_size // PATCH  # patches per row: 16 or 12
    for example in test_split[:100]:
        scene, image = example.scene, np.array(example.image())
        mask = np.array(object_mask(scene))
        targets = patch_targets(scene)
        assert targets.shape == (side * side, 7) and int((targets[:, 5] >= 0).sum()) == len(scene.objects)
        for index, obj in enumerate(scene.objects):
            x, y = obj.glyph
            width, height = 3 * GLYPH_SCALE, 5 * GLYPH_SCALE
            patch_row, patch_col = obj.glyph_patch
            assert (x + width - 1) // PATCH == patch_col and (y + height - 1) // PATCH == patch_row  # one patch
            top, left = patch_row * PATCH, patch_col * PATCH
            assert (mask[top : top + PATCH, left : left + PATCH] == index + 1).all()  # the patch is on the object
            drawn = (image[y : y + height, x : x + width] == GLYPH_COLOR).all(-1)
            bitmap = np.array([[bit == "1" for bit in row] for row in DIGITS[obj.digit]])
            assert (drawn == bitmap.repeat(GLYPH_SCALE, 0).repeat(GLYPH_SCALE, 1)).all()  # the digit, pixel-exact
            assert targets[patch_row * side + patch_col, 5] == obj.digit


def test_tint_answers_are_the_one_region_around_the_object_and_look_like_its_hue(any_cluttered_split):
    from pyramiddrop.synthetic.scene import region_index

    name, test_split = any_cluttered_split
    tints = [e for e in test_split if e.type == "tint"]
    for example in tints:
        scene, query = example.scene, example.query
        obj = next(o for o in scene.objects if (o.shape, o.color) == (query["shape"], query["color"]))
        x0, y0, x1, y1 = surround_box(obj, scene_set(name).image_size)
        ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
        owners = np.unique(region_index(scene, xs, ys))
        assert len(owners) == 1 and scene.regions[owners[0]].hue == example.answer
        # what a viewer sees: the ring's background pixels (object, glyph and marks excluded) average to the hue
        image, mask = np.array(example.image()).astype(float), np.array(object_mask(scene))
        ring = np.zeros(mask.shape, bool)
        ring[y0 : y1 + 1, x0 : x1 + 1] = True
        ring &= mask == 0
        ring &= ~(image == image[..., :1]).all(-1)  # grey marks
        mean = image[ring].mean(0)
        nearest = min(HUES, key=lambda hue: np.linalg.norm(mean - np.array(HUES[hue])))
        assert nearest == example.answer


def test_a_tint_question_about_an_object_on_a_border_raises():
    example = next(e for e in make_split("test", 60, scenes="cluttered") if e.type == "color")
    scene = example.scene
    border = next(o for o in scene.objects if surround_hue(scene, o) is None)
    question = f"what tint is behind the {border.color} {border.shape}?"
    with pytest.raises(ValueError, match="no single tint behind the .* straddles regions"):
        answer_question(scene, question)
    for question, answer, qtype in extra_questions(scene, 2, 0, 40):  # follow-up turns never ask it
        assert answer_question(scene, question) == answer
        assert qtype != "tint" or f"{border.color} {border.shape}" not in question


def test_shapes_scenes_have_no_reading_or_tint_answers():
    scene = make_split("test", 1)[0].scene
    obj = scene.objects[0]
    with pytest.raises(ValueError, match="carries no digit"):
        answer_question(scene, f"what number is on the {obj.color} {obj.shape}?")
    with pytest.raises(ValueError, match="no single tint"):
        answer_question(scene, f"what tint is behind the {obj.color} {obj.shape}?")
    with pytest.raises(ValueError, match="unknown scene set 'flat'; choose from shapes, cluttered"):
        make_split("test", 1, scenes="flat")


def test_material_targets_are_the_background_region_at_each_patch_centre(test_split):
    from pyramiddrop.synthetic.patches import patch_targets
    from pyramiddrop.synthetic.scene import region_index

    scene = test_split[3].scene
    targets = patch_targets(scene)
    for patch in range(256):
        row, col = divmod(patch, 16)
        owner = region_index(scene, np.array(col * PATCH + 8), np.array(row * PATCH + 8))
        expected = -100 if targets[patch, 0] > 0 else scene.regions[int(owner)].material
        assert targets[patch, 6] == expected


def test_mean_pairwise_cosine_is_the_mean_over_distinct_pairs():
    from pyramiddrop.synthetic.similarity import mean_pairwise_cosine

    tokens = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in itertools.permutations(tokens, 2)]
    assert mean_pairwise_cosine(tokens) == pytest.approx(float(torch.stack(pairs).mean()), abs=1e-6)
    assert mean_pairwise_cosine(torch.ones(3, 4)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two tokens"):
        mean_pairwise_cosine(tokens[:1])


@pytest.fixture(scope="module")
def cluttered_model():
    from pyramiddrop.synthetic.model import build_model

    return build_model(0, hidden_size=64, num_layers=2, scenes="cluttered")


def test_a_cluttered_model_has_256_tokens_its_words_and_its_scene_set_in_the_config(cluttered_model, tmp_path):
    from pyramiddrop.synthetic.data import build_prompt
    from pyramiddrop.synthetic.model import encode, load, save, scenes_of

    model, processor = cluttered_model
    examples = make_split("test", 12, scenes="cluttered")
    inputs = encode(processor, examples)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum(1)[0]) == 256
    tokenizer = processor.tokenizer
    for example in examples:
        ids = tokenizer(build_prompt(example.question) + " " + example.answer)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids[-1:]) == example.answer
    save(model, processor, tmp_path)
    assert scenes_of(tmp_path) == "cluttered" and scenes_of(load(tmp_path)[0]) == "cluttered"
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["image_size"] == 256
    from pyramiddrop.synthetic.model import EMBEDDED_MODEL_DIR

    assert scenes_of(EMBEDDED_MODEL_DIR) == "shapes"  # the shipped model predates the field


def test_background_similarity_on_a_model_equals_a_per_scene_transcription(cluttered_model):
    from pyramiddrop.synthetic.patches import patch_owners
    from pyramiddrop.synthetic.similarity import background_and_object_similarity

    model, processor = cluttered_model
    examples = make_split("validation", 3, scenes="cluttered")
    background, objects = background_and_object_similarity(model, processor, examples, batch_size=2)
    for example, got_background, got_objects in zip(examples, background, objects):
        pixels = processor.image_processor(example.image(), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
            tokens = model.model.multi_modal_projector(hidden[:, 1:])[0]
        on_object = patch_owners(example.scene) >= 0
        for group, got in ((tokens[~on_object], got_background), (tokens[on_object], got_objects)):
            unit = torch.nn.functional.normalize(group, dim=-1)
            gram = unit @ unit.T
            expected = (gram.sum() - gram.trace()) / (len(group) * (len(group) - 1))
            assert got == pytest.approx(float(expected), abs=1e-5)


def test_stage1_on_cluttered_scenes_trains_the_cls_token_digits_and_materials(cluttered_model):
    from pyramiddrop.synthetic.patches import PAIRS, PatchDataset, PatchPretrainer, evaluate_patches, scene_pairs

    model, processor = cluttered_model
    dataset = PatchDataset(processor.image_processor, 2, scenes="cluttered")
    batch = [dataset[i] for i in range(2)]
    inputs = {key: torch.stack([sample[key] for sample in batch]) for key in batch[0]}
    scene = make_split("test", 1, scenes="cluttered")[0].scene
    assert scene_pairs(scene).sum() == len(scene.objects)
    pretrainer = PatchPretrainer(model.model.vision_tower, model.model.multi_modal_projector, 64, scenes="cluttered")
    out = pretrainer(**inputs)
    assert out["cls_logits"].shape == (2, PAIRS) and [h.shape[-1] for h in out["logits"]][5:] == [10, 24]
    model.zero_grad()
    loss = out["loss"]
    without_cls = pretrainer(inputs["pixel_values"], inputs["patch_labels"])["loss"]
    expected_cls = torch.nn.functional.binary_cross_entropy_with_logits(out["cls_logits"], inputs["scene_pairs"])
    assert (loss - without_cls).item() == pytest.approx(expected_cls.item(), rel=1e-5)
    # digits are scored on glyph patches only: the loss does not change with the digit logits anywhere else
    labels = inputs["patch_labels"]
    elsewhere = (labels[..., 5] < 0).unsqueeze(-1)
    digit_start = sum(pretrainer.heads[:5])

    def shifted(module, args, output):  # add noise to the digit logits of patches without a glyph
        noise = torch.zeros_like(output)
        noise[..., digit_start : digit_start + 10] = 5 * torch.randn_like(output[..., :10])
        return output + noise * elsewhere

    handle = pretrainer.head.register_forward_hook(shifted)
    with torch.no_grad():
        noisy = pretrainer(inputs["pixel_values"], labels)["loss"]
    handle.remove()
    assert noisy.item() == pytest.approx(without_cls.item(), rel=1e-5)
    loss.backward()
    assert pretrainer.cls_head.weight.grad.abs().sum() > 0
    # the CLS target reaches the tower through its pooled CLS output
    assert model.model.vision_tower.post_layernorm.weight.grad.abs().sum() > 0
    metrics = evaluate_patches(pretrainer, processor.image_processor, n=4)
    assert {"glyph_digit_accuracy", "background_material_accuracy", "cls_scene_set_exact"} <= set(metrics)


def test_init_from_a_model_of_the_other_scene_set_is_refused(tmp_path, capsys, cluttered_model):
    from pyramiddrop.synthetic.model import save
    from pyramiddrop.synthetic.train import main

    save(*cluttered_model, tmp_path / "cluttered")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "never"), "--init", str(tmp_path / "cluttered")])
    assert "was trained on cluttered scenes, not shapes: pass --scenes cluttered" in capsys.readouterr().err


def test_a_run_saved_before_new_flags_resumes_with_their_defaults(tmp_path):
    from pyramiddrop.synthetic.train import RUN_ARGS, parse_args

    run = tmp_path / "old"
    run.mkdir()
    saved = vars(parse_args(["--out", str(tmp_path / "x")]))
    for key in ("scenes", "projector_lr_scale", "data_workers", "phases", "out"):
        saved.pop(key)
    (run / RUN_ARGS).write_text(json.dumps({k: str(v) if k == "init" and v else v for k, v in saved.items()}))
    args = parse_args(["--resume", str(run), "--threads", "1"])
    assert (args.scenes, args.projector_lr_scale, args.data_workers, args.threads) == ("shapes", 1.0, 0, 1)


@pytest.mark.slow
def test_a_quick_cluttered_run_with_a_slow_projector_and_a_data_worker(tmp_path):
    """The cluttered recipe end to end; the projector moves 10x less than at the full rate, and a data worker
    gives the same weights as rendering in the training process."""
    from safetensors.torch import load_file

    from pyramiddrop.synthetic.train import main

    flags = ["--quick", "--scenes", "cluttered", "--eval-size", "0", "--hidden-size", "64", "--layers", "2"]
    metrics = main(["--out", str(tmp_path / "slow"), *flags, "--projector-lr-scale", "0.1", "--data-workers", "1"])
    assert {"glyph_digit_accuracy", "cls_scene_set_exact"} <= set(metrics["patch_metrics"])
    main(["--out", str(tmp_path / "inline"), *flags, "--vision-steps", "0", "--init", str(tmp_path / "slow/stage1")])
    main(
        [
            "--out",
            str(tmp_path / "worker"),
            *flags,
            "--vision-steps",
            "0",
            "--init",
            str(tmp_path / "slow/stage1"),
            "--data-workers",
            "1",
        ]
    )
    inline, worker = (load_file(tmp_path / run / "model.safetensors") for run in ("inline", "worker"))
    for name, weight in inline.items():
        assert torch.equal(weight, worker[name]), name
    start = load_file(tmp_path / "slow" / "stage1" / "model.safetensors")
    slow = load_file(tmp_path / "slow" / "model.safetensors")
    projector = [name for name in start if "multi_modal_projector" in name and name.endswith("weight")]
    moved_slow = sum((slow[n] - start[n]).abs().sum() for n in projector)
    moved_full = sum((inline[n] - start[n]).abs().sum() for n in projector)
    assert 0 < moved_slow < 0.5 * moved_full


def test_commands_ask_a_cluttered_model_cluttered_questions(tmp_path, cluttered_model):
    import argparse

    from pyramiddrop.cli.data import calibration_examples, questions
    from pyramiddrop.synthetic.model import save

    save(*cluttered_model, tmp_path)
    args = argparse.Namespace(data=None, seed=None, limit=12, model=str(tmp_path), objective="loyalty")
    asked = questions(args)
    assert [e["question"] for e in asked] == [e.question for e in make_split("test", 12, scenes="cluttered")]
    assert {e["type"] for e in asked} == set(SPEC.question_types) and asked[0]["image"].size == (256, 256)
    args.seed = 5
    assert [e["question"] for e in questions(args)] == [e.question for e in generate(12, 5, scenes="cluttered")]
    assert calibration_examples(args)[0]["image"].size == (256, 256)
    args.model = None  # the embedded model: the shapes scenes it was trained on
    assert questions(args)[0]["image"].size == (192, 192)
