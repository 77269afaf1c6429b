"""`results.md` of `benchmarks/gpu.py`: the prefill, training and correctness tables and the sections' status."""

from __future__ import annotations

PREFILL_COLUMNS = [
    ("shape", lambda r, s: s),
    ("batch", lambda r, s: r["batch_size"]),
    ("method", lambda r, s: r["method"]),
    ("kept per stage", lambda r, s: " / ".join(map(str, r["kept_visual_tokens_per_stage"]))),
    ("avg visual", lambda r, s: f"{r['avg_visual_tokens']:.0f}"),
    ("prefill ms", lambda r, s: f"{r['prefill_ms']:.2f}"),
    ("TTFT change", lambda r, s: f"{100 * r['time_change']:+.1f} %"),
    ("speed-up", lambda r, s: f"{r['speedup']:.2f}"),
    ("FLOPs-predicted", lambda r, s: f"{r['predicted_speedup']:.2f}"),
    ("measured / predicted", lambda r, s: f"{r['measured_over_predicted']:.2f}"),
    ("rank ms per drop", lambda r, s: f"{r['rank_ms_per_drop']:.3f}" if r["drops_ranked"] else "-"),
    ("rank share", lambda r, s: f"{100 * r['rank_share']:.2f} %"),
    ("decode ms/token", lambda r, s: f"{r['decode_ms_per_token']:.2f}"),
    ("KV cache MB", lambda r, s: f"{r['kv_cache_bytes'] / 2**20:.1f}"),
    ("peak MB", lambda r, s: f"{r['peak_mem_mb']:.0f}"),
    ("peak above resident MB", lambda r, s: f"{r['peak_over_resident_mb']:.0f}"),
]
TRAIN_COLUMNS = [
    ("shape", lambda r, s: s),
    ("batch", lambda r, s: r["batch_size"]),
    ("method", lambda r, s: r["method"]),
    ("step ms", lambda r, s: f"{r['train_step_ms']:.1f}"),
    ("time ratio", lambda r, s: f"{1 / r['speedup']:.3f}"),
    ("FLOPs-predicted ratio", lambda r, s: f"{1 / r['predicted_speedup']:.3f}"),
    ("rank ms per drop", lambda r, s: f"{r['rank_ms_per_drop']:.3f}" if r["drops_ranked"] else "-"),
    ("peak MB", lambda r, s: f"{r['peak_mem_mb']:.0f}"),
    ("peak above resident MB", lambda r, s: f"{r['peak_over_resident_mb']:.0f}"),
]


def _table(columns, rows: list[tuple[dict, str]]) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell(row, shape)) for _, cell in columns) + " |" for row, shape in rows]


def format_markdown(results: dict) -> str:
    env, sections = results["environment"], results["sections"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    device = env["device_name"]
    if "driver" in env:
        device += f" ({env.get('device_memory_gb')} GB), driver {env['driver']}, CUDA {env['torch_cuda']}"
    lines = [
        f"# benchmarks/gpu.py results ({'finished' if results['finished'] else 'partial'}, "
        f"{results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget)",
        "",
        f"{device}; {versions}; Python {env['python']}; commit {env['git_commit'] or 'unknown'}; {env['date']}.",
    ]
    model = sections.get("build_model", {})
    if model.get("status") == "ok":
        lines += [""]
        lines.append(
            f"Language model: {model['num_layers']} of {model['full_depth']} layers built "
            f"({model['language_model_parameters'] / 1e6:,.1f} M parameters, built in {model['build_s']:.0f} s); "
            "speed-ups are depth-independent, times scale by full depth / layers."
        )
    prefill = [
        (row, name.split("_")[1])
        for name, s in sections.items()
        if name.startswith("prefill")
        for row in s.get("rows", [])
    ]
    train = [
        (row, name.split("_")[1])
        for name, s in sections.items()
        if name.startswith("train")
        for row in s.get("rows", [])
    ]
    if prefill:
        lines += ["", "## Prefill (time to first token of the language model), decode, memory", ""]
        lines += _table(PREFILL_COLUMNS, prefill)
    if train:
        lines += ["", "## Training step (forward + backward, gradient checkpointing)", ""]
        lines += _table(TRAIN_COLUMNS, train)
    checks = [check for name in ("correctness", "video") for check in sections.get(name, {}).get("checks", [])]
    if checks:
        lines += ["", "## Correctness", "", "| check | attn | position mode | passed | max abs logit diff / kept |"]
        lines.append("|---|---|---|---|---|")
        for check in checks:
            detail = check.get("max_abs_logit_diff")
            detail = f"{detail:.2e}" if detail is not None else str(check.get("kept_per_stage_and_frame"))
            lines.append(
                f"| {check['check']} | {check.get('attn', '-')} | {check.get('position_mode', '-')} | "
                f"{check['passed']} | {detail} |"
            )
    lines += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, section in sections.items():
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', '-')} | {section.get('reason', '')} |")
    return "\n".join(lines) + "\n"
