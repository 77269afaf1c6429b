"""The paper's Fig. 1 as a tool: how redundant are visual tokens at each depth?

`redundancy_study` drops visual tokens once after layer ℓ (ranked by the last prompt token's attention) for
several depths and keep ratios and measures accuracy; `attention_concentration` measures, per layer, the
share of the last token's attention over visual tokens that the top 10% of them hold.
"""

from __future__ import annotations

import torch

from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.evaluate import Setting, evaluate
from pyramiddrop.scoring import RankInputs, attention_scores


def study_settings(depths: list[int], ratios: list[float]) -> list[Setting]:
    settings = [Setting("none", None)]
    for depth in depths:
        for ratio in ratios:
            config = PyramidDropConfig(layer_list=[depth], image_token_ratio_list=[ratio])
            settings.append(Setting("pdrop", config, {"depth": depth, "keep_ratio": ratio}))
    return settings


def redundancy_study(model, processor, examples, depths, ratios, build_inputs, batch_size=16) -> list[dict]:
    rows, _ = evaluate(model, processor, examples, study_settings(depths, ratios), build_inputs, batch_size)
    return rows


@torch.no_grad()
def attention_concentration(model, processor, examples, build_inputs, top_fraction: float = 0.1) -> list[float]:
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
            visual = inputs["input_ids"] == model.config.image_token_id
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


def plot_study(rows: list[dict], concentration: list[float], accuracy_path: str, concentration_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next(row["accuracy"] for row in rows if row["method"] == "none")
    figure, axis = plt.subplots(figsize=(6, 4))
    for depth in sorted({row["settings"]["depth"] for row in rows if "depth" in row["settings"]}):
        points = sorted(
            (row["settings"]["keep_ratio"], row["accuracy"]) for row in rows if row["settings"].get("depth") == depth
        )
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"drop after layer {depth}")
    axis.axhline(baseline, color="gray", linestyle="--", label="no drop")
    axis.set_xlabel("kept fraction of visual tokens")
    axis.set_ylabel("accuracy")
    axis.set_title("Visual-token redundancy by depth (one drop, last-token attention)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(accuracy_path, dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(range(len(concentration)), concentration)
    axis.set_xlabel("layer")
    axis.set_ylabel("attention share of the top 10% visual tokens")
    axis.set_ylim(0, 1)
    axis.set_title("How concentrated the last token's attention over visual tokens is, per layer", fontsize=9)
    figure.tight_layout()
    figure.savefig(concentration_path, dpi=120)
    plt.close(figure)
