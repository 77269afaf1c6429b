"""`tune`: search the schedule (where to drop, how many tokens to keep) that best serves a model at a budget.

The paper fixes equal stages and one λ; whether that suits a given model is an open question, so this searches
`layer_list` and `image_token_ratio_list` with optuna's TPE sampler over `tune_space.ScheduleSpace`, whose every
point meets the budget. The objective is label-free by default: loyalty to the unpruned model, the mean
KL(no drop || schedule) of the first answer token's distribution from one forward per calibration example, so
unlabelled images of one's own domain suffice; with answers, accuracy can be maximised instead. The paper's
equal-stage schedule at the same budget is measured too and competes with the trials, so the result is never
worse than the default on the calibration set.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pyramiddrop.budget import METHODS, average_visual_fraction, budget_from_flops_fraction, pyramid_schedule
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.flops import paper_flops
from pyramiddrop.tools.answers import normalize_answer
from pyramiddrop.tools.inputs import build_inputs, count_visual_tokens, open_image, use_drop
from pyramiddrop.tune_space import Schedule, ScheduleSpace

# What each objective measures and which way is better.
OBJECTIVES = {
    "loyalty": ("first_token_kl", "minimize"),  # mean KL(no drop || schedule) of the first answer token, nats
    "agreement": ("first_token_agreement", "maximize"),  # share of examples with no drop's top-1 first token
    "accuracy": ("accuracy", "maximize"),  # greedy answers equal to the given ones (needs answers)
}


class CalibrationSet:
    """The calibration examples, tokenised once, with no drop's first-token distribution as the reference."""

    def __init__(self, model, processor, examples: list[dict], batch_size: int = 16) -> None:
        self.model, self.processor = model, processor
        self.answers = [example.get("answer") for example in examples]
        self.batches = []
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            images = [open_image(example["image"]) for example in batch]
            self.batches.append(build_inputs(processor, images, [example["question"] for example in batch]))
        first = self.batches[0]
        self.num_visual_tokens = int(count_visual_tokens(model, first["input_ids"][:1])[0])
        self.reference = self._first_token_logprobs(None)

    def __len__(self) -> int:
        return len(self.answers)

    @torch.no_grad()
    def _first_token_logprobs(self, config: PyramidDropConfig | None) -> torch.Tensor:
        with _applied(self.model, config):
            logits = [self.model(**inputs, logits_to_keep=1).logits[:, -1].float() for inputs in self.batches]
        return torch.log_softmax(torch.cat(logits), dim=-1)

    @torch.no_grad()
    def accuracy(self, config: PyramidDropConfig | None, max_new_tokens: int = 4) -> float:
        """Share of greedy answers equal to the given ones (first word, as `pdrop eval` scores)."""
        correct, index = 0, 0
        with _applied(self.model, config):
            for inputs in self.batches:
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                for text in texts:
                    correct += normalize_answer(text) == normalize_answer(self.answers[index])
                    index += 1
        return correct / len(self)

    def per_example(self, config: PyramidDropConfig | None) -> tuple[list[float], list[int]]:
        """Per example: KL(no drop || config) of the first answer token (nats), and 1 where the top-1 agrees."""
        logprobs = self._first_token_logprobs(config)
        kl = (self.reference.exp() * (self.reference - logprobs)).sum(-1).clamp(min=0)
        return kl.tolist(), (logprobs.argmax(-1) == self.reference.argmax(-1)).int().tolist()

    def measure(self, config: PyramidDropConfig, with_accuracy: bool = False) -> dict:
        """Loyalty of `config` to no drop (mean first-token KL and top-1 agreement), and accuracy if asked."""
        kl, agreement = self.per_example(config)
        result = {"first_token_kl": sum(kl) / len(kl), "first_token_agreement": sum(agreement) / len(agreement)}
        if with_accuracy:
            result["accuracy"] = self.accuracy(config)
        return result


class _applied:
    """`with _applied(model, config)`: the model drops with `config` inside (no drop for None), plain after."""

    def __init__(self, model, config: PyramidDropConfig | None) -> None:
        self.model, self.config = model, config

    def __enter__(self) -> None:
        use_drop(self.model, self.config)

    def __exit__(self, *exc) -> None:
        use_drop(self.model, None)


@dataclass
class TuneResult:
    """The best schedule, every trial (and the paper's schedule) with its measures, and what the run was."""

    config: PyramidDropConfig
    best: dict
    trials: list[dict]
    baseline: dict | None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "best": self.best,
            "baseline": self.baseline,
            "trials": self.trials,
            "config": self.config.to_dict(),
        }


def tune(
    model,
    processor,
    examples: list[dict],
    budget: float,
    budget_kind: str = "tokens",
    stages: tuple[int, int] = (2, 5),
    objective: str = "loyalty",
    trials: int = 50,
    method: str = "pdrop",
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> TuneResult:
    """The schedule of `stages` stages meeting `budget` that optimises `objective` on `examples`.

    Every check that can fail does so before the first trial: the objective, method, examples (accuracy needs
    answers), stage range against the model's depth and whether the budget is reachable on it.
    """
    started = time.perf_counter()
    try:
        import optuna
    except ImportError as error:
        raise ImportError("tuning needs optuna: pip install 'pyramiddrop[tune]'") from error
    space, calibration, text = _prepare(
        model, processor, examples, budget, budget_kind, stages, objective, trials, method, batch_size
    )

    key, direction = OBJECTIVES[objective]
    overrides = METHODS[method]
    shape = (text.num_hidden_layers, text.hidden_size, text.intermediate_size, space.num_visual_tokens)
    measured: dict[Schedule, dict] = {}
    history: list[dict] = []
    configs: dict[str | int, PyramidDropConfig] = {}  # the exact configs (the history rounds the ratios)

    def record(schedule_config: PyramidDropConfig, label: str | int, schedule: Schedule | None) -> dict:
        begin = time.perf_counter()
        if schedule is not None and schedule in measured:  # the box maps many points to one schedule
            result = {**measured[schedule], "repeat": True}
        else:
            result = calibration.measure(schedule_config, with_accuracy=objective == "accuracy")
            result["seconds"] = time.perf_counter() - begin
            if schedule is not None:
                measured[schedule] = result
        entry = {
            "trial": label,
            "stages": schedule_config.num_stages,
            "layer_list": schedule_config.layer_list,
            "image_token_ratio_list": [round(r, 6) for r in schedule_config.image_token_ratio_list],
            "kept": [max(1, int(space.num_visual_tokens * r)) for r in schedule_config.image_token_ratio_list],
            "visual_fraction": average_visual_fraction(schedule_config, shape[0], space.num_visual_tokens),
            "flops_fraction": paper_flops(*shape, schedule_config) / paper_flops(*shape),
            "objective": result[key],
            **result,
        }
        history.append(entry)
        configs[label] = schedule_config
        return entry

    baseline = None
    baseline_config = _paper_schedule(space, text)
    if baseline_config is not None:
        baseline = record(replace(baseline_config, **overrides), "paper", None)

    def objective_function(trial) -> float:
        count = trial.suggest_categorical("stages", space.feasible_stages)
        layer_units = [trial.suggest_float(f"layer_{j}", 0.0, 1.0) for j in range(count - 1)]
        keep_units = [trial.suggest_float(f"keep_{j}", 0.0, 1.0) for j in range(count - 2)]
        schedule = space.decode(count, layer_units, keep_units)
        return record(schedule.config(**overrides), trial.number, schedule)["objective"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate / group
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    study = optuna.create_study(direction=direction, sampler=sampler)
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    best = baseline
    bar = tqdm(total=trials, disable=not progress, desc="pdrop tune", unit="trial")
    if progress and baseline is not None:
        tqdm.write(_table_header(objective))
        tqdm.write(_table_row(baseline))

    def after_trial(study, frozen) -> None:
        nonlocal best
        entry = history[-1]
        if best is None or better(entry["objective"], best["objective"]):
            best = entry
            if progress:
                if baseline is None and len(history) == 1:
                    tqdm.write(_table_header(objective))
                tqdm.write(_table_row(entry))
        bar.set_postfix({objective: f"{best['objective']:.4g}", "best": best["trial"]})
        bar.update(1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective_function, n_trials=trials, callbacks=[after_trial])
    bar.close()
    config = configs[best["trial"]]
    settings = {
        "budget": budget,
        "budget_kind": budget_kind,
        "stages": list(stages),
        "feasible_stages": space.feasible_stages,
        "objective": objective,
        "objective_key": key,
        "direction": direction,
        "trials": trials,
        "unique_schedules": len(measured),
        "method": method,
        "seed": seed,
        "calibration_examples": len(calibration),
        "num_layers": shape[0],
        "num_visual_tokens": space.num_visual_tokens,
        "sampler": "optuna TPESampler(multivariate=True, group=True)",
        "optuna": optuna.__version__,
        "seconds": time.perf_counter() - started,
    }
    return TuneResult(config, best, history, baseline, settings)


def _prepare(model, processor, examples, budget, budget_kind, stages, objective, trials, method, batch):
    """Every argument check, then the space and the calibration set (the reference forward): before any trial."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)} (a scorer on the tuned schedule), got {method!r}.")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}.")
    if not examples:
        raise ValueError("the calibration set is empty; give at least one example (image and question).")
    if objective == "accuracy":
        missing = sum(example.get("answer") is None for example in examples)
        if missing:
            raise ValueError(
                f"objective accuracy needs an answer for every example; {missing} of {len(examples)} have none "
                "(use objective loyalty or agreement, which need no labels)."
            )
    text = model.config.get_text_config()
    probe = build_inputs(processor, [open_image(examples[0]["image"])], [examples[0]["question"]])
    num_visual = int(count_visual_tokens(model, probe["input_ids"])[0])
    space = ScheduleSpace(
        text.num_hidden_layers,
        num_visual,
        budget,
        stages=stages,
        kind=budget_kind,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
    )
    return space, CalibrationSet(model, processor, examples, batch), text


def _paper_schedule(space: ScheduleSpace, text) -> PyramidDropConfig | None:
    """The paper's equal-stage λ schedule at the same budget (`budget.pyramid_schedule`), if it meets it."""
    token_budget = space.budget
    try:
        if space.kind == "flops":
            token_budget = budget_from_flops_fraction(
                space.budget, text.num_hidden_layers, text.hidden_size, text.intermediate_size, space.num_visual_tokens
            )
        return pyramid_schedule(token_budget, text.num_hidden_layers, space.num_visual_tokens)
    except ValueError:  # the budget is reachable by the search but not by equal stages
        return None


def _table_header(objective: str) -> str:
    return f"{'trial':>6} {'stages':>6} {'layer_list':<16} {'kept':<22} {'budget':>7} {'FLOPs':>6} {objective:>10}"


def _table_row(entry: dict) -> str:
    return (
        f"{entry['trial']!s:>6} {entry['stages']:>6} {str(entry['layer_list']):<16} {str(entry['kept']):<22} "
        f"{entry['visual_fraction']:>7.3f} {entry['flops_fraction']:>6.3f} {entry['objective']:>10.4g}"
    )


def history_paths(schedule_path: str | Path) -> tuple[Path, Path]:
    """Where the trial history and its plot go: next to the schedule, `<name>_trials.json` and `.png`."""
    path = Path(schedule_path)
    return path.with_name(f"{path.stem}_trials.json"), path.with_name(f"{path.stem}_trials.png")


def save(result: TuneResult, schedule_path: str | Path) -> list[Path]:
    """The schedule (loads with `PyramidDropConfig.from_json`), the trial history and its plot."""
    history_json, history_png = history_paths(schedule_path)
    result.config.to_json(schedule_path)
    history_json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    plot_history(result, history_png)
    return [Path(schedule_path), history_json, history_png]


def plot_history(result: TuneResult, path: str | Path) -> None:
    """Objective vs paper FLOPs per trial (every trial meets the budget), and the best so far by trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [entry for entry in result.trials if entry["trial"] != "paper"]
    key, direction = result.settings["objective_key"], result.settings["direction"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    points = left.scatter(
        [e["flops_fraction"] for e in trials], [e[key] for e in trials], c=[e["stages"] for e in trials], cmap="viridis"
    )
    figure.colorbar(points, ax=left, label="stages")
    if result.baseline is not None:
        left.scatter([result.baseline["flops_fraction"]], [result.baseline[key]], marker="*", s=200, c="red")
        left.annotate("paper's schedule", (result.baseline["flops_fraction"], result.baseline[key]))
    left.set_xlabel("paper-convention FLOPs / no drop")
    left.set_ylabel(key)
    left.set_title(f"trials at budget {result.settings['budget']:g} ({result.settings['budget_kind']})")
    values = [e[key] for e in trials]
    running = [min(values[: i + 1]) if direction == "minimize" else max(values[: i + 1]) for i in range(len(values))]
    right.plot(range(len(values)), values, "o", alpha=0.4, label="trial")
    right.plot(range(len(values)), running, "-", label="best so far")
    if result.baseline is not None:
        right.axhline(result.baseline[key], color="red", linestyle="--", label="paper's schedule")
    right.set_xlabel("trial")
    right.set_ylabel(key)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
