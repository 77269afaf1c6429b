"""`benchmarks/gpu.py --smoke`: the prepared GPU run on CPU with tiny shapes, so the script never rots before a
GPU machine is at hand; plus its time caps, skips and error records (no timing assertions)."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyramiddrop.flops import tokens_per_layer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
SECTIONS = [
    "build_model",
    "prefill_llava-1.5-7b_b1",
    "prefill_llava-next-7b_b1",
    "prefill_llava-1.5-7b_b8",
    "prefill_llava-next-7b_b8",
    "train_llava-next-7b_b1",
    "correctness",
    "video",
]


def load_script():
    """benchmarks/gpu.py as a module (registered first: its dataclasses look their module up)."""
    if "gpu_script" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_script", SCRIPT)
        module = sys.modules["gpu_script"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_script"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), out


def test_smoke_runs_every_section(smoke):
    results, _, out = smoke
    sections = results["sections"]
    assert list(sections) == SECTIONS and results["finished"]
    for name in SECTIONS[:-1]:
        assert sections[name]["status"] == "ok", sections[name]
    if HAS_TORCHVISION:
        assert sections["video"]["status"] == "ok" and sections["video"]["all_passed"]
        for family in ("qwen2_vl", "llava_onevision"):
            assert (out / f"video_{family}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert sections["video"] == {
            "status": "skipped",
            "reason": "torchvision is not installed: transformers' video processors need it",
        }
    environment = results["environment"]
    import torch
    import transformers

    assert environment["versions"]["torch"] == torch.__version__
    assert environment["versions"]["transformers"] == transformers.__version__
    assert environment["device"] == "cpu"


def expected_kv_bytes(row: dict, shape: dict) -> int:
    """Keys and values of every layer's cache after prefill: text tokens plus the visual tokens of its stage."""
    from pyramiddrop import PyramidDropConfig

    settings = row["settings"]
    config = PyramidDropConfig(settings["layer_list"], settings["image_token_ratio_list"]) if settings else None
    per_layer = tokens_per_layer(shape["num_layers"], shape["visual_tokens"], config)
    kv_dim = shape["num_kv_heads"] * shape["hidden_size"] // shape["num_heads"]
    return row["batch_size"] * sum(shape["text_tokens"] + n for n in per_layer) * 2 * kv_dim * 2  # bf16


def test_prefill_rows_count_kept_tokens_cache_and_speedups(smoke):
    results, _, _ = smoke
    prefill = {name: s for name, s in results["sections"].items() if name.startswith("prefill")}
    assert {row["batch_size"] for s in prefill.values() for row in s["rows"]} == {1, 8}
    for section in prefill.values():
        shape, rows = section["shape"], section["rows"]
        assert [row["method"] for row in rows] == ["none", "pdrop", "fastv"]
        n = shape["visual_tokens"]
        none, pdrop, fastv = rows
        assert none["kept_visual_tokens_per_stage"] == [n] and none["speedup"] == 1.0 and none["drops_ranked"] == 0
        assert pdrop["kept_visual_tokens_per_stage"] == [n, n // 2, n // 4, n // 8]
        assert fastv["kept_visual_tokens_per_stage"] == [n, int(n * fastv["settings"]["image_token_ratio_list"][0])]
        assert abs(fastv["avg_visual_tokens"] - pdrop["avg_visual_tokens"]) <= 0.02 * pdrop["avg_visual_tokens"]
        for row, drops in zip(rows, [0, 3, 1]):
            assert row["kv_cache_bytes"] == expected_kv_bytes(row, shape)
            assert row["drops_ranked"] == drops and (row["rank_ms_per_drop"] > 0) == (drops > 0)
            assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_mem_mb"] > 0
            assert row["repeats"] == results["plan"]["repeats"] and row["dtype"] == "bfloat16"
            assert row["time_change"] == pytest.approx(1 / row["speedup"] - 1)
            assert row["measured_over_predicted"] == pytest.approx(row["speedup"] / row["predicted_speedup"])
            assert row["predicted_speedup_full_depth"] == pytest.approx(row["predicted_speedup"])
        assert pdrop["predicted_speedup"] > 1.5 and fastv["predicted_speedup"] > 1.5
        assert pdrop["kv_cache_bytes"] < none["kv_cache_bytes"]


def test_training_rows(smoke):
    results, _, _ = smoke
    rows = results["sections"]["train_llava-next-7b_b1"]["rows"]
    assert [row["method"] for row in rows] == ["none", "pdrop", "fastv"]
    assert rows[1]["kept_visual_tokens_per_stage"] == [320, 160, 80, 40]
    for row, drops in zip(rows, [0, 3, 1]):
        assert row["train_step_ms"] > 0 and row["peak_mem_mb"] > 0 and row["gradient_checkpointing"]
        assert row["drops_ranked"] == drops and "prefill_ms" not in row and "kv_cache_bytes" not in row
    assert rows[1]["predicted_speedup"] > 1.5


def test_correctness_checks_pass_for_both_backends_and_position_modes(smoke):
    results, _, _ = smoke
    section = results["sections"]["correctness"]
    checks = section["checks"]
    assert section["all_passed"] and all(check["passed"] for check in checks)
    assert {(c["check"], c["attn"], c["position_mode"]) for c in checks} == {
        (check, attn, mode)
        for check in ("padded batch = samples alone", "cached decoding = full recompute")
        for attn in ("sdpa", "eager")
        for mode in ("compact", "original")
    }
    assert all(check["max_abs_logit_diff"] < 1e-4 for check in checks)


def test_markdown_report_has_every_table_and_section(smoke):
    _, markdown, _ = smoke
    for heading in ("## Prefill", "## Training step", "## Correctness", "## Sections"):
        assert heading in markdown
    for name in SECTIONS:
        assert f"| {name} |" in markdown
    assert "| llava-next-7b | 8 | pdrop | 320 / 160 / 80 / 40 |" in markdown


def test_runner_records_errors_timeouts_skips_and_interrupts(tmp_path):
    gpu = load_script()
    header = {"environment": gpu.environment(gpu.smoke_plan(60.0))}
    runner = gpu.Runner(tmp_path, 60.0, {"slow": 0.3}, header)
    runner.run("fails", lambda deadline: {"value": 1 / 0})
    started = time.monotonic()
    runner.run("slow", lambda deadline: time.sleep(10))
    assert time.monotonic() - started < 5
    runner.run("needs_fails", lambda deadline: {}, needs="fails")
    runner.run("fine", lambda deadline: {"value": 2})
    runner.budget_s = 1.0  # spent: later sections are skipped, not started
    runner.run("late", lambda deadline: {"value": 3})
    previous = signal.signal(signal.SIGTERM, gpu._raise_interrupted)
    try:
        runner.budget_s = 60.0
        with pytest.raises(gpu.Interrupted):
            runner.run("killed", lambda deadline: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(10))
    finally:
        signal.signal(signal.SIGTERM, previous)
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert sections["fails"]["status"] == "error"
    assert sections["fails"]["reason"] == "ZeroDivisionError: division by zero"
    assert sections["slow"] == {**sections["slow"], "status": "timeout", "reason": "ran past its cap of 0.3 s"}
    assert sections["needs_fails"]["reason"] == "section fails did not succeed"
    assert sections["fine"]["status"] == "ok" and sections["fine"]["value"] == 2
    assert sections["late"]["status"] == "skipped"
    assert re.fullmatch(r"the total budget \(1 s\) leaves 0\.\d s, under 5 s", sections["late"]["reason"])
    assert sections["killed"]["status"] == "interrupted"
    assert "| killed | interrupted |" in (tmp_path / "results.md").read_text()


def test_depth_is_reduced_only_when_the_device_is_too_small():
    gpu = load_script()
    plan = gpu.gpu_plan(32, 10, 3, 450.0)
    assert gpu.fit_depth(plan, 141.0) == 32  # an H200 holds the full depth at batch 8 and for training
    assert gpu.fit_depth(plan, 24.0) == 16
    assert gpu.memory_needed_gb(plan.shapes["llava-next-7b"], 8, False) < 40


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--smoke", "--layers", "30"], "--layers must be a multiple of 4 in [4, 32] (4 equal stages), got 30"),
        (["--smoke", "--repeats", "0"], "--repeats must be at least 1 and --warmup at least 0, got 0 and 3"),
        ([], "no CUDA device is visible; run on a GPU machine, or add --smoke for the CPU check"),
    ],
)
def test_bad_arguments_say_what_to_change(argv, message, capsys, tmp_path):
    gpu = load_script()
    if not argv and gpu.torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit):
        gpu.parse_args(["--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
