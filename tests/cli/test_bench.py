"""`pdrop bench` runs on a tiny shape and writes the documented JSON keys (no timing assertions)."""

import json

import pytest

from pyramiddrop.cli import main

KEYS = {
    "method",
    "dtype",
    "prefill_ms",
    "speedup",
    "predicted_speedup",
    "rank_share",
    "decode_ms_per_token",
    "kv_cache_bytes",
    "peak_mem_mb",
}


def test_bench_tiny_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    main(
        [
            "bench",
            "--preset",
            "tiny",
            "--dtype",
            "float32",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--decode-steps",
            "2",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["none", "pdrop", "fastv"]
    for row in rows:
        assert set(row) >= KEYS
    none, pdrop, fastv = rows
    assert none["speedup"] == 1.0 and pdrop["predicted_speedup"] > 1.0
    assert pdrop["kv_cache_bytes"] < none["kv_cache_bytes"] and fastv["kv_cache_bytes"] < none["kv_cache_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pdrop" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_train_times_a_backward_pass_with_checkpointing(tmp_path, capsys):
    out = tmp_path / "train.json"
    args = ["bench", "--preset", "tiny", "--dtype", "float32", "--repeats", "2", "--warmup", "1", "--train"]
    main([*args, "--gradient-checkpointing", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["none", "pdrop", "fastv"]
    for row in rows:
        assert row["train_step_ms"] > 0 and row["peak_mem_mb"] > 0 and row["gradient_checkpointing"]
        assert "prefill_ms" not in row and "kv_cache_bytes" not in row
    assert rows[1]["predicted_speedup"] > 1.0
    assert "time ratio" in capsys.readouterr().out


def test_bench_rejects_checkpointing_without_train(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--preset", "tiny", "--gradient-checkpointing"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == "pdrop bench: error: argument --gradient-checkpointing: only applies with --train\n"
    )


@pytest.mark.parametrize("drop", [False, True], ids=["no drop", "pdrop"])
def test_decode_timing_continues_the_cache_by_its_current_name(drop):
    """No `past_key_values/cache_params are deprecated` warning: the cache is read and passed as `cache`."""
    import subprocess
    import sys

    code = """
import torch
from pyramiddrop.config import PyramidDropConfig
from pyramiddrop.tools.bench import PRESETS, build_model, prompt_inputs
from pyramiddrop.tools.bench_measure import measure_setting_memory
shape = PRESETS["tiny"]
model = build_model(shape, torch.float32, "cpu")
config = PyramidDropConfig.from_lambda(shape.num_layers, 2, 0.5).to_dict() if DROP else None
row = measure_setting_memory(model, prompt_inputs(shape, 1, "cpu"), config, "cpu", decode_steps=3)
print(row["kv_cache_bytes"] > 0)
"""
    code = code.replace("DROP", str(drop))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "deprecated" not in result.stderr, result.stderr
