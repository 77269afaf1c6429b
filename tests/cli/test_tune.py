"""`pyramiddrop.tune` and `pdrop tune`: the constrained space, the label-free objective, the files, the errors."""

import itertools
import json
import random

import pytest

from pyramiddrop.budget import average_visual_fraction
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.flops import paper_flops, tokens_per_layer
from pyramiddrop.tune_space import ScheduleSpace, parse_stage_range

EMBEDDED = {"num_layers": 8, "num_visual_tokens": 144, "hidden_size": 128, "intermediate_size": 512}


def _random_points(space, count, seed=0):
    rng = random.Random(seed)
    for _ in range(count):
        stages = rng.choice(space.feasible_stages)
        yield stages, [rng.random() for _ in range(stages - 1)], [rng.random() for _ in range(stages - 2)]


@pytest.mark.parametrize("kind", ["tokens", "flops"])
@pytest.mark.parametrize("budget", [0.5, 1 / 3, 2 / 9, 0.131])
def test_every_point_of_the_box_meets_the_budget_within_2_percent(kind, budget):
    space = ScheduleSpace(budget=budget, kind=kind, stages=(2, 5), **EMBEDDED)
    for stages, layer_units, keep_units in _random_points(space, 150):
        schedule = space.decode(stages, layer_units, keep_units)
        config = schedule.config()
        assert config.num_stages == stages
        assert list(schedule.layer_list) == config.layer_list
        counts = tokens_per_layer(8, 144, config)  # what the engine keeps, layer by layer
        assert sorted(set(counts), reverse=True) == [144, *schedule.kept]
        if kind == "tokens":
            achieved = average_visual_fraction(config, 8, 144)
        else:
            achieved = paper_flops(8, 128, 512, 144, config) / paper_flops(8, 128, 512, 144)
        assert achieved == pytest.approx(space.cost_fraction(schedule))
        assert abs(achieved - budget) <= 0.02 * budget, (schedule, achieved)


def test_a_deep_model_decodes_too():
    space = ScheduleSpace(num_layers=32, num_visual_tokens=576, budget=0.25, stages=(3, 6))
    for stages, layer_units, keep_units in _random_points(space, 40, seed=1):
        config = space.decode(stages, layer_units, keep_units).config()
        assert abs(average_visual_fraction(config, 32, 576) - 0.25) <= 0.005


def _all_schedules(num_layers, num_tokens, budget, stages):
    """Brute force: every layer list and strictly decreasing count list with the cost within 2 %."""
    found = set()
    for count in range(stages[0], stages[1] + 1):
        for layers in itertools.combinations(range(1, num_layers), count - 1):
            for kept in itertools.combinations(range(num_tokens - 1, 0, -1), count - 1):
                config = PyramidDropConfig(list(layers), [(n + 0.5) / num_tokens for n in kept])
                if abs(average_visual_fraction(config, num_layers, num_tokens) - budget) <= 0.02 * budget:
                    found.add((layers, kept))
    return found


def test_decoded_schedules_are_exactly_feasible_ones_and_the_box_reaches_every_layer_list():
    space = ScheduleSpace(num_layers=5, num_visual_tokens=10, budget=0.4, stages=(2, 4))
    feasible = _all_schedules(5, 10, 0.4, (2, 4))
    assert space.feasible_stages == sorted({len(layers) + 1 for layers, _ in feasible})
    grid = [i / 6 + 1 / 12 for i in range(6)]
    decoded = set()
    for stages in space.feasible_stages:
        for layer_units in itertools.product(grid, repeat=stages - 1):
            for keep_units in itertools.product(grid, repeat=stages - 2):
                schedule = space.decode(stages, layer_units, keep_units)
                decoded.add((schedule.layer_list, schedule.kept))
    assert decoded <= feasible
    assert {layers for layers, _ in decoded} == {layers for layers, _ in feasible}


def test_unreachable_budgets_and_depths_fail_with_the_valid_range():
    with pytest.raises(
        ValueError,
        match=r"budget 0.1 \(tokens\) cannot be met with 2-5 stages on 8 layers and 144 "
        r"visual tokens: reachable budgets are 0.131 to 0.999",
    ):
        ScheduleSpace(budget=0.1, **EMBEDDED)
    with pytest.raises(
        ValueError, match="stages 2-9 is outside the model's depth: a model with 8 decoder layers has 2 to 8 stages"
    ):
        ScheduleSpace(budget=0.3, stages=(2, 9), **EMBEDDED)
    with pytest.raises(ValueError, match="budget must be a fraction in"):
        ScheduleSpace(budget=1.5, **EMBEDDED)
    assert parse_stage_range("3") == (3, 3) and parse_stage_range("2-5") == (2, 5)
    with pytest.raises(ValueError, match="stages '5-2' is not a stage count or a range"):
        parse_stage_range("5-2")


def test_config_json_round_trip_and_unknown_keys(tmp_path):
    config = PyramidDropConfig([1, 3], [0.4, 0.1], position_mode="original")
    config.to_json(tmp_path / "schedule.json")
    assert PyramidDropConfig.from_json(tmp_path / "schedule.json") == config
    (tmp_path / "bad.json").write_text(json.dumps({"layer_list": [2], "image_token_ratio_list": [0.5], "lam": 1}))
    with pytest.raises(ValueError, match=r"bad.json: unknown keys \['lam'\]"):
        PyramidDropConfig.from_json(tmp_path / "bad.json")


# The embedded model, on a few validation examples.


@pytest.fixture(scope="module")
def embedded():
    from pyramiddrop.synthetic.data import make_split
    from pyramiddrop.synthetic.model import require_embedded_model
    from pyramiddrop.tools.inputs import load_model

    processor, model = load_model(str(require_embedded_model()))
    examples = [{"image": e.image(), "question": e.question, "answer": e.answer} for e in make_split("validation", 12)]
    return model, processor, examples


@pytest.mark.slow
def test_tune_returns_the_best_trial_and_its_loyalty_is_pdrop_evals(embedded):
    from pyramiddrop.settings import Setting
    from pyramiddrop.tools.evaluate import evaluate
    from pyramiddrop.tools.tune import tune

    model, processor, examples = embedded
    label_free = [{"image": e["image"], "question": e["question"]} for e in examples]
    result = tune(model, processor, label_free, 1 / 3, trials=4, batch_size=6, progress=False)
    assert [entry["trial"] for entry in result.trials] == ["paper", 0, 1, 2, 3]
    assert result.baseline["layer_list"] == [2, 4, 6]  # the equal-stage schedule of budget.pyramid_schedule
    assert result.best["objective"] == min(entry["first_token_kl"] for entry in result.trials)
    for entry in result.trials:
        assert abs(entry["visual_fraction"] - 1 / 3) <= 0.02 / 3
    assert average_visual_fraction(result.config, 8, 144) == pytest.approx(result.best["visual_fraction"])
    # the objective is what `pdrop eval` reports as first_token_kl / first_token_agreement for that schedule
    rows, _ = evaluate(
        model,
        processor,
        examples,
        [Setting("none", None), Setting("pdrop", result.config)],
        batch_size=6,
        max_new_tokens=1,
        progress=False,
    )
    assert rows[1]["first_token_kl"] == pytest.approx(result.best["first_token_kl"], rel=1e-4, abs=1e-6)
    assert rows[1]["first_token_agreement"] == pytest.approx(result.best["first_token_agreement"])


def test_tune_checks_everything_before_the_first_trial(embedded):
    from pyramiddrop.tools.tune import tune

    model, processor, examples = embedded
    with pytest.raises(ValueError, match="the calibration set is empty"):
        tune(model, processor, [], 0.3)
    with pytest.raises(ValueError, match="objective accuracy needs an answer for every example; 1 of 2 have none"):
        tune(
            model,
            processor,
            [examples[0], {"image": examples[1]["image"], "question": "?"}],
            0.3,
            objective="accuracy",
        )
    with pytest.raises(ValueError, match="reachable budgets are 0.131 to 0.999"):
        tune(model, processor, examples[:2], 0.12)


def test_pdrop_tune_writes_schedule_history_and_plot_and_eval_reads_it(tmp_path, capsys):
    from pyramiddrop.cli import main

    out = tmp_path / "schedule.json"
    main(
        [
            "tune",
            "--limit",
            "6",
            "--budget",
            "0.5",
            "--trials",
            "3",
            "--stages",
            "2-3",
            "--batch-size",
            "6",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert "wrote" in printed.out and "trials (" in printed.out
    config = PyramidDropConfig.from_json(out)
    assert 2 <= config.num_stages <= 3 or config.layer_list == [2, 4, 6]  # a trial, or the paper's schedule
    assert abs(average_visual_fraction(config, 8, 144) - 0.5) <= 0.01
    history = json.loads((tmp_path / "schedule_trials.json").read_text())
    assert len(history["trials"]) == 4 and history["settings"]["calibration_examples"] == 6
    assert history["config"] == config.to_dict()
    assert (tmp_path / "schedule_trials.png").stat().st_size > 10_000
    main(
        [
            "eval",
            "--limit",
            "6",
            "--budget",
            "0.5",
            "--methods",
            "pdrop",
            "--schedule",
            str(out),
            "--batch-size",
            "6",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert [row["method"] for row in rows] == ["none", "pdrop", "schedule"]
    assert rows[2]["settings"]["layer_list"] == config.layer_list
    assert rows[2]["diff_vs_pdrop_ci"] is not None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "0.1"], "argument --budget: budget 0.1 (tokens) cannot be met with 2-5 stages on 8 layers"),
        (["--budget", "0.3", "--stages", "2-9"], "argument --stages: 2-9 is outside the model's depth; a model with 8"),
        (["--budget", "1.2"], "argument --budget: 1.2 is out of range; give a fraction in (0, 1)"),
        (["--budget", "0.3", "--trials", "0"], "argument --trials: 0 is out of range; give a positive integer"),
        (["--budget", "0.3", "--stages", "x"], "argument --stages: 'x' is not a stage count or range of 2 or more"),
    ],
)
def test_pdrop_tune_rejects_bad_values_with_the_valid_range(flags, message, capsys):
    from pyramiddrop.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--limit", "2", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_pdrop_tune_data_errors(tmp_path, capsys):
    from pyramiddrop.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (tmp_path / "a.png").write_bytes(b"")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"image": "a.png", "question": "what?"}) + "\n")
    bad_schedule = tmp_path / "schedule.json"
    bad_schedule.write_text(json.dumps({"layer_list": [2], "image_token_ratio_list": [0.5, 0.2]}))
    cases = [
        (["tune", "--budget", "0.3", "--data", str(empty)], "holds no examples"),
        (
            ["tune", "--budget", "0.3", "--data", str(unlabelled), "--objective", "accuracy"],
            "accuracy needs an answer on every line of --data; 1 of 1 have none",
        ),
        (["eval", "--schedule", str(bad_schedule)], "argument --schedule: layer_list has 1 entries but"),
        (["eval", "--schedule", str(tmp_path / "missing.json")], "argument --schedule:"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_pdrop_tune_value_errors_answer_without_torch(tmp_path):
    import subprocess
    import sys

    code = """
import json, sys
from pyramiddrop.cli import main
codes = []
for argv in (["tune", "--help"], ["tune", "--budget", "1.2"], ["tune", "--budget", "0.3", "--stages", "4-2"],
             ["tune", "--budget", "0.3", "--out", "nodir/s.json"]):
    try:
        main(argv)
    except SystemExit as exit:
        codes.append(exit.code)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"codes": [0, 2, 2, 2], "heavy": []}
    assert "argument --out: the folder nodir does not exist" in result.stderr


def test_tune_with_a_flops_budget_keeps_every_trial_and_the_paper_schedule_within_2_percent(embedded):
    from pyramiddrop.tools.tune import tune

    model, processor, examples = embedded
    result = tune(model, processor, examples[:4], 0.4, budget_kind="flops", trials=3, batch_size=4, progress=False)
    assert len(result.trials) == 4 and result.trials[0]["trial"] == "paper"
    for entry in result.trials:
        assert abs(entry["flops_fraction"] - 0.4) <= 0.02 * 0.4, entry


def test_pdrop_tune_on_an_unlabelled_jsonl(tmp_path, capsys):
    from pyramiddrop.cli import main
    from pyramiddrop.synthetic.data import export_jsonl, make_split

    labelled = export_jsonl(make_split("validation", 4), tmp_path, "labelled")
    lines = [json.loads(line) for line in labelled.read_text().splitlines()]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"image": e["image"], "question": e["question"]}) + "\n" for e in lines))
    main(["tune", "--data", str(calib), "--budget", "0.4", "--trials", "2", "--out", str(tmp_path / "s.json")])
    assert "on 4 examples" in capsys.readouterr().out
    history = json.loads((tmp_path / "s_trials.json").read_text())
    assert history["settings"]["calibration_examples"] == 4 and len(history["trials"]) == 3


def test_tune_for_accuracy_maximises_pdrop_evals_accuracy(embedded):
    from pyramiddrop.settings import Setting
    from pyramiddrop.tools.evaluate import evaluate
    from pyramiddrop.tools.tune import tune

    model, processor, examples = embedded
    result = tune(
        model,
        processor,
        examples[:6],
        0.222,
        objective="accuracy",
        trials=2,
        batch_size=6,
        progress=False,
    )
    assert result.settings["direction"] == "maximize"
    assert result.best["objective"] == max(entry["accuracy"] for entry in result.trials)
    rows, _ = evaluate(model, processor, examples[:6], [Setting("pdrop", result.config)], batch_size=6, progress=False)
    assert rows[0]["accuracy"] == pytest.approx(result.best["accuracy"])
