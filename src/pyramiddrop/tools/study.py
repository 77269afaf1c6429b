"""The paper's Fig. 1 as a tool: how redundant are visual tokens at each depth?

`redundancy_study` drops visual tokens once after layer ℓ (by default ranked by the last prompt token's
attention, any registered scorer with `method`; original positions by default, as FastV) for several depths and
keep ratios and measures accuracy on the same questions; `depth_profile` turns that into the loss vs no drop
per depth with paired-bootstrap intervals, and `horizon_layer` into the shallowest depth from which a drop
costs nothing measurable. `attention_concentration` measures, per layer, the share of the last token's
attention over visual tokens that the top 10% of them hold.
"""

from __future__ import annotations

import torch

from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.scoring import RankInputs, attention_scores
from pyramiddrop.settings import Setting
from pyramiddrop.tools.evaluate import evaluate
from pyramiddrop.tools.inputs import build_inputs, visual_token_mask


def study_settings(
    depths: list[int], ratios: list[float], method: str = "pdrop", position_mode: str = "original", seed: int = 0
) -> list[Setting]:
    """No drop, then one drop after each depth (1-based layer) at each keep ratio, scored by `method`."""
    settings = [Setting("none", None)]
    for depth in depths:
        for ratio in ratios:
            config = PyramidDropConfig(
                layer_list=[depth],
                image_token_ratio_list=[ratio],
                position_mode=position_mode,
                method=method,
                seed=seed,
            )
            settings.append(Setting(method, config, {"depth": depth, "keep_ratio": ratio}))
    return settings


def redundancy_study(
    model,
    processor,
    examples,
    depths,
    ratios,
    batch_size=16,
    method: str = "pdrop",
    position_mode: str = "original",
    seed: int = 0,
) -> list[dict]:
    """One `evaluate` row per setting of `study_settings`, each with its paired difference to no drop."""
    settings = study_settings(depths, ratios, method, position_mode, seed)
    rows, _ = evaluate(model, processor, examples, settings, batch_size)
    return rows


def depth_profile(rows: list[dict]) -> list[dict]:
    """Per (depth, keep ratio), sorted: accuracy with its Wilson interval, and the loss vs no drop.

    The loss is no-drop accuracy minus this one (a fraction; positive = worse), with the 95 % paired-bootstrap
    interval `loss_ci` and the McNemar p of the rows' `diff_vs_none`: it is the number the depth targets are
    stated in, and the paired interval resolves a point or two on the same questions where the accuracies'
    own intervals overlap.
    """
    profile = []
    for row in rows:
        if "depth" not in row["settings"]:
            continue
        low, high = row["diff_vs_none_ci"]
        profile.append(
            {
                "depth": row["settings"]["depth"],
                "keep_ratio": row["settings"]["keep_ratio"],
                "accuracy": row["accuracy"],
                "accuracy_ci": [row["ci_low"], row["ci_high"]],
                "loss": 0.0 - row["diff_vs_none"],  # 0.0 - x: no "-0.0" when nothing changes
                "loss_ci": [0.0 - high, 0.0 - low],
                "mcnemar_p": row["mcnemar_p_vs_none"],
            }
        )
    return sorted(profile, key=lambda entry: (entry["keep_ratio"], entry["depth"]))


def horizon_layer(profile: list[dict], keep_ratio: float) -> int | None:
    """The shallowest studied depth from which the loss at `keep_ratio` stays within its interval of 0.

    That is, for this depth and every deeper one studied, the loss's interval contains 0: dropping after it
    (and later) costs nothing these questions can resolve. None if even the deepest depth's interval
    excludes 0.
    """
    losses = sorted((entry["depth"], entry["loss_ci"]) for entry in profile if entry["keep_ratio"] == keep_ratio)
    if not losses:
        raise ValueError(f"keep ratio {keep_ratio} is not in the study (ratios: {sorted_ratios(profile)}).")
    horizon = None
    for depth, (low, high) in reversed(losses):
        if not low <= 0 <= high:
            break
        horizon = depth
    return horizon


def sorted_ratios(profile: list[dict]) -> list[float]:
    return sorted({entry["keep_ratio"] for entry in profile})


@torch.no_grad()
def attention_concentration(model, processor, examples, top_fraction: float = 0.1) -> list[float]:
    """Per layer, the mean share of the last token's visual attention held by the top `top_fraction` tokens."""
    language_model = model.get_decoder()
    captured: dict[int, tuple] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: captured.__setitem__(
                index, (args[0] if args else kwargs["hidden_states"], kwargs)
            ),
            with_kwargs=True,
        )
        for index, layer in enumerate(language_model.layers)
    ]
    shares = [[] for _ in language_model.layers]
    try:
        for example in examples:
            inputs = build_inputs(processor, [example["image"]], [example["question"]])
            model(**inputs)
            visual = visual_token_mask(model, inputs["input_ids"])
            mask = inputs["attention_mask"].bool()
            last = torch.zeros_like(mask)
            last[:, -1] = True
            for index, layer in enumerate(language_model.layers):
                hidden, kwargs = captured[index]
                rank = RankInputs(
                    hidden,
                    layer,
                    kwargs["position_embeddings"],
                    mask,
                    last,
                    torch.where(visual, visual.long().cumsum(1) - 1, -1),
                    stage=1,
                )
                scores = attention_scores(rank)[visual]
                top = max(1, int(len(scores) * top_fraction))
                shares[index].append(float(scores.topk(top).values.sum() / scores.sum()))
    finally:
        for hook in hooks:
            hook.remove()
    return [sum(values) / len(values) for values in shares]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_and_save(figure, axis, path: str, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    if legend:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)


def plot_study(
    rows: list[dict],
    concentration: list[float] | None,
    accuracy_path: str,
    concentration_path: str,
    method: str = "pdrop",
) -> None:
    """Accuracy vs keep ratio per depth (paper Fig. 1) and, if measured, the attention concentration per layer."""
    plt = _pyplot()

    baseline = next(row["accuracy"] for row in rows if row["method"] == "none")
    figure, axis = plt.subplots(figsize=(6, 4))
    for depth in sorted({row["settings"]["depth"] for row in rows if "depth" in row["settings"]}):
        points = sorted(
            (row["settings"]["keep_ratio"], row["accuracy"]) for row in rows if row["settings"].get("depth") == depth
        )
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"drop after layer {depth}")
    axis.axhline(baseline, color="gray", linestyle="--", label="no drop")
    title = f"Visual-token redundancy by depth (one drop, {method} selection)"
    _label_and_save(figure, axis, accuracy_path, "kept fraction of visual tokens", "accuracy", title)
    if concentration is None:
        return

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(range(len(concentration)), concentration)
    axis.set_ylim(0, 1)
    title = "How concentrated the last token's attention over visual tokens is, per layer"
    ylabel = "attention share of the top 10% visual tokens"
    _label_and_save(figure, axis, concentration_path, "layer", ylabel, title, legend=False)


def plot_profile(profile: list[dict], path: str, method: str = "pdrop") -> None:
    """Loss vs no drop (points) against drop depth, one line per keep ratio, with the 95 % bootstrap intervals."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for ratio in sorted_ratios(profile):
        entries = [entry for entry in profile if entry["keep_ratio"] == ratio]
        loss = [100 * entry["loss"] for entry in entries]
        errors = [
            [100 * (entry["loss"] - entry["loss_ci"][0]) for entry in entries],
            [100 * (entry["loss_ci"][1] - entry["loss"]) for entry in entries],
        ]
        depths = [entry["depth"] for entry in entries]
        axis.errorbar(depths, loss, yerr=errors, marker="o", capsize=3, label=f"keep {ratio:g}")
    axis.axhline(0, color="gray", linestyle="--", linewidth=1)
    axis.set_xticks(sorted({entry["depth"] for entry in profile}))
    title = f"Depth profile: one drop, {method} selection (95% paired bootstrap)"
    _label_and_save(figure, axis, path, "drop after layer (1-based)", "loss vs no drop (points)", title)
