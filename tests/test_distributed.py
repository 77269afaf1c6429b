"""Two processes under torchrun (DDP, gloo) match one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(tmp_path, name, *launcher):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    subprocess.run([*launcher, str(HERE / "dist_worker.py"), str(out)], check=True, env=env, timeout=600)
    return json.loads(out.read_text())


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
        "--master_port",
        "29517",
    )
    for a, b in zip(single["losses"], ddp["losses"]):
        assert abs(a - b) < 1e-5
    assert single["losses"][0] > single["losses"][-1]  # it trains
    for name, value in single["weights"].items():
        assert abs(value - ddp["weights"][name]) < 1e-4 * max(1.0, abs(value)), name
