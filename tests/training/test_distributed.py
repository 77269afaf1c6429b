"""Two processes (gloo, CPU) under DDP, accelerate, FSDP2 and DeepSpeed ZeRO-2/3 match one process on the same global
batch: the same losses and updated weights. Each test launches its processes (10-40 s); `-m "not distributed"`
leaves them out of a quick run."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "tests" / "support"  # dist_worker.py and the tiny models it imports
pytestmark = pytest.mark.distributed


def free_port() -> str:
    """A port no one listens on now, so concurrent test runs on one machine never join each other's process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]


def launch(tmp_path, name, *launcher, worker_args=()) -> tuple[int, Path, str]:
    """Run the worker under `launcher`; (exit status, its result file, its output)."""
    out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=f"{SUPPORT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    # A session of its own, so a timeout kills the launcher's workers too instead of leaving them running.
    with log.open("w") as handle:
        process = subprocess.Popen(
            [*launcher, str(SUPPORT / "dist_worker.py"), str(out), *worker_args],
            env=env,
            start_new_session=True,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return process.returncode, out, log.read_text()


def run(tmp_path, name, *launcher, worker_args=()) -> dict:
    code, out, output = launch(tmp_path, name, *launcher, worker_args=worker_args)
    assert code == 0, f"{name}: the launcher exited with {code}:\n{output[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("single"), "single", sys.executable)


def assert_same_run(single, distributed):
    assert distributed["world"] == 2
    for a, b in zip(single["losses"], distributed["losses"]):
        assert abs(a - b) < 1e-5
    assert single["losses"][0] > single["losses"][-1]  # it trains
    assert distributed["weights"].keys() >= single["weights"].keys()
    for name, value in single["weights"].items():
        assert abs(value - distributed["weights"][name]) < 1e-4 * max(1.0, abs(value)), name


def test_two_process_ddp_matches_single_process(tmp_path, single):
    ddp = run(tmp_path, "ddp", *torchrun(), "--master_port", free_port(), worker_args=["--mode", "ddp"])
    assert ddp["wrapper"] == "DistributedDataParallel"
    assert_same_run(single, ddp)


def test_accelerate_launch_matches_single_process(tmp_path, single):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", free_port()]
    launched = run(tmp_path, "accelerate", *launcher, worker_args=["--mode", "accelerate"])
    assert_same_run(single, launched)


@pytest.mark.parametrize("wrap", ["layer", "root"])
def test_fsdp2_through_accelerate_matches_single_process(tmp_path, single, wrap):
    """Decoder layers as FSDP units (the ranking reads a layer's norm, q and k inside that layer's own pre-hook, after
    FSDP2's unshard hook, which runs first), or none (the root unit holds them): both give the single-process run."""
    fsdp = run(
        tmp_path, f"fsdp2-{wrap}", *torchrun(), "--master_port", free_port(), worker_args=["--mode", f"fsdp2-{wrap}"]
    )
    assert fsdp["wrapper"] == "FSDPLlavaForConditionalGeneration"
    assert ("FSDPLlamaDecoderLayer" in fsdp["fsdp_units"]) == (wrap == "layer")
    assert_same_run(single, fsdp)


def test_fsdp1_refuses_cpu_processes(tmp_path):
    """accelerate's default FSDP version is 1; torch 2.13's FSDP1 cannot run without an accelerator device."""
    code, _, output = launch(
        tmp_path, "fsdp1", *torchrun(), "--master_port", free_port(), worker_args=["--mode", "fsdp1-layer"]
    )
    assert code != 0
    assert "FSDP needs a non-CPU accelerator device, but no accelerator device is detected." in output


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_single_process(tmp_path, single, stage):
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'pyramiddrop[deepspeed]'")
    zero = run(
        tmp_path, f"zero{stage}", *torchrun(), "--master_port", free_port(), worker_args=["--mode", f"zero{stage}"]
    )
    assert zero["wrapper"] == "DeepSpeedEngine"
    assert_same_run(single, zero)


def test_fsdp_accelerate_example_runs(tmp_path):
    launcher = [*torchrun(), "--master_port", free_port()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    example = ROOT / "examples" / "fsdp_accelerate.py"
    done = subprocess.run(
        [*launcher, str(example), "--steps", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("(FSDPLlavaForConditionalGeneration)") == 2  # two steps, printed by rank 0
