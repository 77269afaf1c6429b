"""The command line as a newcomer meets it (issue 26): `generate` defaults to the embedded model, a wrong value is
one line naming the argument (exit status 2; `pdrop --debug` shows the traceback), `--help` imports no torch,
`generate --json`. Through the real entry point, in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyramiddrop
from pyramiddrop import cli


def pdrop(*args: str, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # offline: a hub id fails at once
    command = [sys.executable, "-m", "pyramiddrop.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with an image, a text file named like an image, an empty folder and two broken JSONL files."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("newcomer")
    Image.new("RGB", (40, 30), (20, 120, 220)).save(folder / "image.png")
    (folder / "notimage.png").write_text("not an image\n")
    (folder / "folder").mkdir()
    line = {"question": "what ?", "answer": "w7"}
    (folder / "missing.jsonl").write_text(
        "\n".join(json.dumps({"image": name, **line}) for name in ("image.png", "gone.png")) + "\n"
    )
    (folder / "notimage.jsonl").write_text(json.dumps({"image": "notimage.png", **line}) + "\n")
    return folder


PROMPT = ("--prompt", "what ?")
ERRORS = [
    (
        ["generate", "--image", "nope.png", *PROMPT],
        "pdrop generate: error: argument --image: nope.png does not exist; give the path of an image file",
    ),
    (
        ["generate", "--image", "notimage.png", *PROMPT],
        "pdrop generate: error: argument --image: notimage.png is not an image PIL can read; give the path of an image",
    ),
    (
        ["generate", "--model", "./nope", "--image", "image.png", *PROMPT],
        "pdrop generate: error: argument --model: the directory ./nope does not exist; give a local model directory "
        "or a hub id such as llava-hf/llava-1.5-7b-hf",
    ),
    (
        ["generate", "--model", "nope", "--image", "image.png", *PROMPT],
        "pdrop generate: error: argument --model: 'nope' is not a directory here and not a hub id (owner/name); give",
    ),
    (
        ["generate", "--model", "folder", "--image", "image.png", *PROMPT],
        "pdrop generate: error: argument --model: the directory folder has no config.json",
    ),
    (
        ["generate", "--model", "owner/no-such-model", "--image", "image.png", *PROMPT],
        "pdrop generate: error: argument --model: owner/no-such-model is not a directory here and could not be loaded "
        "from the Hugging Face hub (",
    ),
    (["eval", "--data", "nope.jsonl"], "pdrop eval: error: argument --data: nope.jsonl does not exist; give the path"),
    (
        ["eval", "--data", "missing.jsonl"],
        "pdrop eval: error: argument --data: missing.jsonl:2: the image gone.png (",
    ),
    (
        ["eval", "--data", "notimage.jsonl"],
        "pdrop eval: error: argument --data: the image ",  # the resolved path, then:
    ),
    (["study", "--data", "nope.jsonl"], "pdrop study: error: argument --data: nope.jsonl does not exist"),
    (["show", "--image", "nope.png", *PROMPT], "pdrop show: error: argument --image: nope.png does not exist"),
    (["show", "--video", "nope.gif", *PROMPT], "pdrop show: error: argument --video: nope.gif does not exist"),
    (["bench", "--config", "./nope"], "pdrop bench: error: argument --config: ./nope does not exist; give"),
    (["eval", "--json", "nodir/out.json"], "pdrop eval: error: argument --json: the folder nodir does not exist"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[" ".join(argv[:3]) for argv, _ in ERRORS])
def test_a_wrong_value_is_one_line_naming_the_argument_with_status_2(files, argv, message):
    result = pdrop(*argv, cwd=files)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr
    if argv[-1] == "notimage.jsonl":
        assert "notimage.png (named in notimage.jsonl) is not an image PIL can read" in result.stderr


def test_debug_shows_the_traceback(files):
    result = pdrop("--debug", "generate", "--image", "nope.png", *PROMPT, cwd=files)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "UsageError: argument --image: nope.png does not exist" in result.stderr


def test_unexpected_errors_are_not_turned_into_one_liners(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug, not a wrong value")

    monkeypatch.setattr(cli, "check_arguments", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["generate", "--image", "image.png", *PROMPT])


def test_help_and_early_errors_import_no_torch(tmp_path):
    """`import pyramiddrop(.cli)`, `--help` and the argument checks answer without torch or transformers."""
    code = """
import json, sys
import pyramiddrop
from pyramiddrop import PyramidDropConfig
from pyramiddrop.cli import main
codes = []
for argv in (["--help"], ["generate", "--help"], ["eval", "--help"], ["generate", "--image", "nope.png", "--prompt", "x"],
             ["eval", "--model", "nope"], ["study", "--method", "nope"], ["eval", "--baselines", "fastv,nope"]):
    try:
        main(argv)
    except SystemExit as exit:
        codes.append(exit.code)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"codes": [0, 0, 0, 2, 2, 2, 2], "heavy": []}


def test_the_pdrop_script_prints_help(tmp_path):
    script = Path(sys.executable).parent / "pdrop"
    if not script.exists():
        pytest.skip("no pdrop script next to this interpreter (package not installed in it)")
    result = subprocess.run([str(script), "generate", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--model MODEL hub id or local directory (default: the embedded synthetic LLaVA)" in text
    assert "--json JSON" in text


def test_package_exports_lazily():
    assert set(pyramiddrop.__all__) <= set(dir(pyramiddrop))
    assert pyramiddrop.apply_pyramid_drop is pyramiddrop.api.apply_pyramid_drop
    assert pyramiddrop.DropRecord is pyramiddrop.engine.DropRecord
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        pyramiddrop.nope  # noqa: B018


def test_generate_defaults_to_the_embedded_model(files, synthetic_model_dir):
    result = pdrop(
        "generate", "--image", "image.png", "--prompt", "what color is the shape ?", "--max-new-tokens", "1", cwd=files
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("answer: ")
    assert lines[1].startswith("visual tokens per stage: ")


def test_generate_writes_json(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "generate.json"
    flags = ["--model", str(tiny_model_dir), "--image", "image.png", *PROMPT, "--max-new-tokens", "2"]
    result = pdrop("generate", *flags, "--lam", "0.5", "--stages", "3", "--json", str(out), cwd=files)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    assert row["answer"] == result.stdout.splitlines()[0].removeprefix("answer: ")
    assert row["method"] == "pdrop" and row["visual_tokens"] == 64
    assert row["visual_tokens_per_stage"] == [64, 32, 16]
    assert row["settings"]["layer_list"] == [2, 4] and row["settings"]["image_token_ratio_list"] == [0.5, 0.25]
    assert (row["settings"]["lam"], row["settings"]["stages"]) == (0.5, 3)
    for kind in ("paper", "e2e"):
        assert 0 < row[f"flops_{kind}"] < row[f"flops_{kind}_no_drop"]
        assert row[f"flops_{kind}_saved"] == pytest.approx(1 - row[f"flops_{kind}"] / row[f"flops_{kind}_no_drop"])
        assert f"({row[f'flops_{kind}_saved']:.1%} saved)" in result.stdout
    assert row["prefill_ms"] > 0
    assert row["run"] == {
        "model": str(tiny_model_dir),
        "image": "image.png",
        "prompt": "what ?",
        "follow_up": [],
        "conversation": "keep",
        "max_new_tokens": 2,
        "attn": "sdpa",
        "dtype": "float32",
    }
    assert row["follow_ups"] == []

    flags[flags.index("image.png")] = str(files / "image.png")  # in process, for the no-drop row
    cli.main(["generate", *flags, "--no-drop", "--json", str(out)])
    capsys.readouterr()
    row = json.loads(out.read_text())
    assert (row["method"], row["settings"], row["visual_tokens_per_stage"]) == ("none", {}, [64])
    assert row["flops_paper_saved"] == 0 and row["flops_e2e_saved"] == 0
