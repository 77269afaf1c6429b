"""The synthetic VQA generator, its answers, the tiny LLaVA's tokenizer / processor, and offline loading."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from pyramiddrop.evaluate import load_jsonl
from pyramiddrop.synthetic.data import (
    ANSWERS,
    CELL,
    CELL_NAMES,
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
    assert 0.3 < chance_accuracy([e.type for e in examples]) < 0.35


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
    from pyramiddrop.synthetic.train import patch_targets

    example = make_split("test", 1)[0]
    targets = patch_targets(example.scene)
    assert targets.shape == (144, 4) and int(targets[:, 2].sum()) == len(example.scene.objects)
    for o in example.scene.objects:
        patch = (o.cy // 16) * 12 + o.cx // 16
        assert targets[patch, 2] == 1 and targets[patch, 1] == 1 + list(COLORS).index(o.color)
        assert targets[patch, 3] == o.row * 3 + o.col  # every patch lies in one 64 px cell
    assert targets[:, 3].bincount().tolist() == [16] * 9


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
    import pytest

    from pyramiddrop.synthetic.train import Phase, curriculum_phases

    assert curriculum_phases("150:1-1:color,800:2-4", 1000) == [
        Phase(150, (1, 1), "color"),
        Phase(800, (2, 4)),
        Phase(50, (3, 6)),
    ]
    with pytest.raises(ValueError, match="STEPS:MIN-MAX"):
        curriculum_phases("150:1-1:colour", 1000)
    with pytest.raises(ValueError, match="raise --steps"):
        curriculum_phases("900:1-2,200:2-4", 1000)


def test_single_type_phase_keeps_one_type_balanced_and_single_turn():
    from pyramiddrop.synthetic.data import ANSWERS, make_example
    from pyramiddrop.synthetic.model import build_processor
    from pyramiddrop.synthetic.train import VQADataset

    processor = build_processor()
    dataset = VQADataset(processor, 12, turns=4, scene_objects=(1, 1), question_type="color")
    tokenizer = processor.tokenizer
    for index in range(len(ANSWERS["color"])):
        sample = dataset[index]
        answer = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
        assert tokenizer.decode(answer[:-1]) == ANSWERS["color"][index]  # balanced: each answer in turn
        assert answer[-1] == tokenizer.eos_token_id and len(answer) == 2  # one turn only
        example = make_example(0, index * 5)
        assert example.type == "color"


def test_stage1_patch_head_reads_the_projector_output():
    """With the projector in stage 1, the per-patch loss trains it; without, it never sees the projector."""
    from pyramiddrop.synthetic.model import build_model
    from pyramiddrop.synthetic.train import PatchDataset, PatchPretrainer

    model, processor = build_model(0, hidden_size=64, num_layers=2)
    batch = [PatchDataset(processor.image_processor, 2)[i] for i in range(2)]
    inputs = {key: torch.stack([sample[key] for sample in batch]) for key in batch[0]}
    projector = model.model.multi_modal_projector
    for aligned in (True, False):
        model.zero_grad()
        pretrainer = PatchPretrainer(model.model.vision_tower, projector if aligned else None, 64 if aligned else 128)
        pretrainer(**inputs)["loss"].backward()
        assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
        gradient = projector.linear_1.weight.grad
        assert (gradient is not None and gradient.abs().sum() > 0) == aligned
    # Row and column targets add two 3-way losses (weight 2): at the uniform start each is about log 3.
    pretrainer = PatchPretrainer(model.model.vision_tower, projector, 64, row_col=True)
    with torch.no_grad():
        pretrainer.row_col_head.weight.zero_()
        pretrainer.row_col_head.bias.zero_()
    base = PatchPretrainer(model.model.vision_tower, projector, 64)
    base.head.load_state_dict(pretrainer.head.state_dict())
    with torch.no_grad():
        difference = pretrainer(**inputs)["loss"] - base(**inputs)["loss"]
    assert difference.item() == pytest.approx(4 * math.log(3), rel=1e-5)


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


def test_focus_patches_mark_the_objects_a_question_names():
    from pyramiddrop.synthetic.train import focus_patches, patch_cells, patch_owners

    example = make_split("test", 10)[3]  # spatial: two named objects
    assert example.type == "spatial"
    owners = patch_owners(example.scene)
    mask = focus_patches(example.scene, example.question, owners)
    named = {
        i
        for i, o in enumerate(example.scene.objects)
        if (o.shape, o.color)
        in {
            (example.query["shape"], example.query["color"]),
            (example.query["other_shape"], example.query["other_color"]),
        }
    }
    assert len(named) == 2
    assert mask.tolist() == [int(owner) in named for owner in owners]
    # an absent object has no patches; an empty cell's patches stand for "nothing"
    scene = example.scene
    absent = next(
        (s, c)
        for s in ("circle", "square", "triangle")
        for c in COLORS
        if (s, c) not in {(o.shape, o.color) for o in scene.objects}
    )
    assert not focus_patches(scene, f"is there a {absent[1]} {absent[0]}?", owners).any()
    empty = next(name for row in CELL_NAMES for name in row if name not in {o.cell for o in scene.objects})
    cell_mask = focus_patches(scene, f"what shape is in the {empty}?", owners)
    flat = [name for row in CELL_NAMES for name in row]
    assert cell_mask.sum() == 16 and (patch_cells()[cell_mask] == flat.index(empty)).all()


def test_focus_loss_is_the_attention_share_on_the_named_patches():
    from transformers import TrainingArguments

    from pyramiddrop.synthetic.model import build_model
    from pyramiddrop.synthetic.train import GroundingTrainer, VQADataset, collate_vqa

    model, processor = build_model(seed=0, init_std=128**-0.5)
    model.set_attn_implementation("eager")
    dataset = VQADataset(processor, 2, turns=3, focus=True)
    batch = collate_vqa(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    trainer = GroundingTrainer(
        model=model,
        args=TrainingArguments("unused", report_to="none", use_cpu=True),
        focus_weight=0.5,
        focus_layers=[1, 3],
    )
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        plain = model(
            **{k: v for k, v in batch.items() if k not in ("answer_positions", "focus_masks")}, output_attentions=True
        )
    # by hand, one (sample, turn, layer) at a time
    terms = []
    for layer in (1, 3):
        for row in range(2):
            visual = (batch["input_ids"][row] == model.config.image_token_id).nonzero().squeeze(1)
            for turn in range(3):
                target = batch["focus_masks"][row, turn]
                if not target.any():
                    continue
                weights = plain.attentions[layer][row, :, batch["answer_positions"][row, turn], visual].mean(0)
                terms.append(-torch.log(weights[target].sum() / weights.sum()))
    assert len(terms) >= 6
    torch.testing.assert_close(loss, plain.loss + 0.5 * torch.stack(terms).mean())
    # the position is the last prompt token: the next label is the answer's first token
    for row in range(2):
        for position in batch["answer_positions"][row]:
            assert batch["labels"][row, position] == -100 and batch["labels"][row, position + 1] != -100


def test_referent_targets_sit_on_the_phrase_and_describe_its_object():
    from pyramiddrop.synthetic.model import build_processor
    from pyramiddrop.synthetic.train import REFERENT_HEADS, VQADataset, referent_targets

    processor = build_processor()
    dataset = VQADataset(processor, 40, turns=4, referents=True)
    seen = collections.Counter()
    for index in range(40):
        sample = dataset[index]
        tokens = processor.tokenizer.convert_ids_to_tokens(sample["input_ids"])
        example = make_example(0, index)
        records = list(zip(sample["referent_positions"].tolist(), sample["referent_targets"].tolist()))
        words = [(position, target[1:]) for position, target in records if target[0] == 0]
        # each phrase is recorded twice: at its last word and, as phrase 1 or 2, at the answer's last prompt token
        answers = [(position, target) for position, target in records if target[0] > 0]
        assert len(answers) == len(words)
        for position, target in answers:
            assert tokens[position] == ":" and tokens[position + 1] not in ("user", "<image>")
            assert target[1:] in [t for _, t in words]
        for position, target in words:
            assert len(target) == len(REFERENT_HEADS)
            word = tokens[position]
            if word in ("circles", "squares", "triangles"):  # "how many {shapes} are there?": the count
                count = sum(o.shape == word[:-1] for o in example.scene.objects)
                assert target == [int(count > 0), -100, -100, -100, -100, count]
                seen["count"] += 1
                continue
            if word in ("circle", "square", "triangle"):  # "... {colour} {shape}" or "the {shape}?"
                colour = tokens[position - 1] if tokens[position - 1] in COLORS else None
                matches = [
                    o for o in example.scene.objects if o.shape == word and (colour is None or o.color == colour)
                ]
            else:  # the last word of a cell name
                name = " ".join(tokens[position - 1 : position + 1]) if word != "center" else "center"
                matches = [o for o in example.scene.objects if o.cell == name]
            if matches:
                obj = matches[0]
                shape_color = [["circle", "square", "triangle"].index(obj.shape), list(COLORS).index(obj.color)]
                assert target == [1, obj.row, obj.col, *shape_color, -100]
                seen["present"] += 1
            else:
                assert target == [0, -100, -100, -100, -100, -100]
                seen["absent"] += 1
    assert seen["present"] > 50 and seen["absent"] > 5 and seen["count"] > 5
    # a spatial question names two objects (first at "is the {c} {s}"), a count question a kind ("how many {s}s")
    spatial = make_split("test", 10)[3]
    positions = [p for p, _ in referent_targets(spatial.scene, spatial.question, len(spatial.question.split()) + 1)]
    assert positions == [3, len(spatial.question.split()) - 1]
    count = make_split("test", 10)[2]
    assert count.type == "count" and [p for p, _ in referent_targets(count.scene, count.question, 6)] == [2]
    assert referent_targets(count.scene, count.question, 6, count=False) == []  # --no-referent-count


def test_referent_loss_is_the_heads_cross_entropy_and_the_heads_are_trained():
    from transformers import TrainingArguments

    from pyramiddrop.synthetic.model import build_model
    from pyramiddrop.synthetic.train import (
        REFERENT_HEADS,
        REFERENT_PLACES,
        GroundingTrainer,
        VQADataset,
        collate_vqa,
        referent_heads,
    )

    model, processor = build_model(seed=0, init_std=128**-0.5)
    dataset = VQADataset(processor, 3, turns=3, referents=True)
    batch = collate_vqa(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    heads = referent_heads(128, [2, 8], [6])
    assert sorted(heads) == ["answer1:6", "answer2:6", "word:2", "word:8"]
    trainer = GroundingTrainer(
        model=model,
        args=TrainingArguments("unused", report_to="none", use_cpu=True),
        referent_weight=0.5,
        referent_layers=[2, 8],
        answer_layers=[6],
        referent_heads=heads,
    )
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        inputs = {k: v for k, v in batch.items() if not k.startswith("referent")}
        plain = model(**inputs, output_hidden_states=True)
    terms = collections.Counter()  # one (record, layer) at a time, summed over the five targets
    for row in range(3):
        for position, target in zip(batch["referent_positions"][row], batch["referent_targets"][row]):
            if position < 0:
                continue
            place = REFERENT_PLACES[target[0]]
            for layer in (2, 8) if place == "word" else (6,):
                parts = heads[f"{place}:{layer}"](plain.hidden_states[layer][row, position]).split(REFERENT_HEADS)
                terms[place] += 1
                terms["sum"] += sum(
                    torch.nn.functional.cross_entropy(part[None], t[None]).item()
                    for part, t in zip(parts, target[1:])
                    if t != -100
                )
    assert terms["word"] >= 8 and terms["answer1"] >= 3 and (batch["referent_positions"] < 0).any()
    count = terms["word"] + terms["answer1"] + terms["answer2"]
    torch.testing.assert_close(loss, plain.loss + 0.5 * terms["sum"] / count)
    optimizer = trainer.create_optimizer()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in heads.parameters())
    assert not any("referent" in name for name, _ in model.named_modules())  # never part of the saved model


def test_layer_flags_are_checked_before_training(tmp_path):
    from pyramiddrop.synthetic.train import main

    with pytest.raises(SystemExit, match=r"\(0-7\) in that range"):
        main(["--out", str(tmp_path), "--quick", "--focus-weight", "1", "--focus-layers", "2,9"])
    with pytest.raises(SystemExit, match="comma"):
        main(["--out", str(tmp_path), "--quick", "--focus-weight", "1", "--focus-layers", "2-4"])
    with pytest.raises(SystemExit, match=r"--referent-layers '9'.*\(0-8\) in that range"):
        main(["--out", str(tmp_path), "--quick", "--referent-weight", "1", "--referent-layers", "9"])
    with pytest.raises(SystemExit, match=r"--referent-answer-layers '6;7'.*comma"):
        main(["--out", str(tmp_path), "--quick", "--referent-weight", "1", "--referent-answer-layers", "6;7"])
    with pytest.raises(SystemExit, match=r"--referent-layers / --referent-answer-layers 3 .*use layers <= 2"):
        main(
            ["--out", str(tmp_path), "--quick", "--referent-weight", "1", "--referent-layers", "3", "--drop-lam", "0.5"]
        )
    with pytest.raises(SystemExit, match=r"3 read hidden states after the first drop"):  # the augmentation's too
        main(["--out", str(tmp_path), "--quick", "--referent-layers", "3"])
    with pytest.raises(SystemExit, match=r"--augment-drop-steps 1500 must fit in the last stage 2 phase \(500 steps\)"):
        main(["--out", str(tmp_path), "--steps", "2150", "--vision-steps", "0", "--eval-size", "0"])


def test_training_flags_that_cannot_work_are_refused_before_training(tmp_path, capsys):
    from pyramiddrop.synthetic.train import main

    for flags, message in [
        (["--rope-theta", "0"], "must be above 1"),
        (["--focus-weight", "-1"], "positive weight"),
        (["--focus-weight", "1", "--drop-lam", "0.5"], "cannot be combined with --drop-lam"),
        (["--referent-weight", "-0.5"], "positive weight"),
        (["--augment-drop-steps", "0"], "give a positive number of steps"),
        (["--augment-drop-lam", "0.3", "--drop-lam", "0.5"], "cannot be combined with --drop-lam"),
        (["--augment-drop-lam", "0.3", "--focus-weight", "1"], "cannot be combined with --focus-weight"),
    ]:
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "never"), "--quick", *flags])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_drop_augmentation_drops_from_its_start_step_only_and_is_never_saved(tmp_path):
    import json

    from pyramiddrop import PyramidDropConfig, is_pyramid_drop_applied
    from pyramiddrop.synthetic.model import build_model
    from pyramiddrop.synthetic.train import DropAugmentation, VQADataset, collate_vqa, main

    model, processor = build_model()
    batch = collate_vqa(processor.tokenizer.pad_token_id)([VQADataset(processor, 2, turns=2)[i] for i in (0, 1)])
    config = PyramidDropConfig.from_lambda(8, 4, 0.5, method="random")
    augmentation = DropAugmentation(model, config, start=1)
    text = batch["input_ids"].shape[1] - 144

    def lengths_at(step: int) -> list[int]:
        state = type("State", (), {"global_step": step})()
        augmentation.on_step_begin(None, state, None)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        augmentation.on_step_end(None, state, None)
        assert not is_pyramid_drop_applied(model)  # validation and saves between steps see every token
        return [h.shape[1] for h in hidden]

    assert lengths_at(0) == [text + 144] * 9
    # the hidden state entering layer 2 (what --referent-layers 2 reads) is taken before the first drop
    assert lengths_at(1) == [text + 144] * 3 + [text + 72] * 2 + [text + 36] * 2 + [text + 18] * 2

    # the default recipe: referent loss and augmentation together; the saved model is a plain LLaVA, and the same
    # seed gives the same weights byte for byte (random drops included)
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run), "--quick", "--vision-steps", "0", "--eval-size", "0"])
    assert "pyramid_drop" not in json.loads((tmp_path / "a" / "config.json").read_text())
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["pyramid_drop"] is None
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
