"""Two processes under torchrun (DDP, gloo) or `accelerate launch` match one process on the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def free_port() -> str:
    """A port no one listens on now, so concurrent test runs on one machine never join each other's process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run(tmp_path, name, *launcher, worker_args=()):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    # A session of its own, so a timeout kills the launcher's workers too instead of leaving them running.
    process = subprocess.Popen(
        [*launcher, str(HERE / "dist_worker.py"), str(out), *worker_args], env=env, start_new_session=True
    )
    try:
        assert process.wait(timeout=300) == 0, f"{name}: the launcher exited with {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return json.loads(out.read_text())


def assert_same_run(single, ddp):
    for a, b in zip(single["losses"], ddp["losses"]):
        assert abs(a - b) < 1e-5
    assert single["losses"][0] > single["losses"][-1]  # it trains
    for name, value in single["weights"].items():
        assert abs(value - ddp["weights"][name]) < 1e-4 * max(1.0, abs(value)), name


def test_two_process_ddp_matches_single_process(tmp_path):
    single = run(tmp_path, "single", sys.executable)
    ddp = run(
        tmp_path,
        "ddp",
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        free_port(),
    )
    assert_same_run(single, ddp)


def test_accelerate_launch_matches_single_process(tmp_path):
    single = run(tmp_path, "single", sys.executable)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launched = run(
        tmp_path,
        "accelerate",
        *launcher,
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        free_port(),
        worker_args=["--accelerate"],
    )
    assert_same_run(single, launched)
