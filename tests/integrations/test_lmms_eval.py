"""The lmms-eval plugin `pdrop_hf` through the real `lmms-eval` command line, against `pdrop eval`.

A local task (`--include_path`) is built from the synthetic test split; the model is the embedded synthetic
LLaVA. Three lmms-eval runs are shared by the tests: no drop and PyramidDrop at batch size 4, and PyramidDrop at batch size 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

import devlock
import pytest
import torch

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, remove_pyramid_drop
from pyramiddrop.budget import schedule_for
from pyramiddrop.integrations import LMMS_MODEL_NAME
from pyramiddrop.integrations.common import DropRequest, continuation_ids
from pyramiddrop.integrations.lmms_tasks import MC_TASK, TASK, write_synthetic_task
from pyramiddrop.settings import Setting
from pyramiddrop.synthetic.data import ANSWERS
from pyramiddrop.synthetic.model import load
from pyramiddrop.tools.answers import normalize_answer
from pyramiddrop.tools.evaluate import evaluate
from pyramiddrop.tools.inputs import load_jsonl

NUM_QUESTIONS = 20
LAM = 0.5
# lmms-eval (installed without its declared dependencies) and the packages its evaluation path imports
HARNESS = ("lmms-eval", "filelock", "datasets", "evaluate", "loguru", "pytablewriter", "pytz", "sacrebleu", "tenacity")


def harness_problems() -> list[str]:
    """What keeps the harness from being the locked one, one line each (empty when it is)."""
    lock, have = devlock.read_lock(), devlock.installed()
    found = [
        f"{name}: locked {lock[name]}, installed {have.get(name, 'nothing')}"
        for name in HARNESS
        if have.get(name) != lock[name]
    ]
    if "filelock" in have and importlib.util.find_spec("filelock._api") is None:
        found.insert(
            0,
            f"lmms-eval {lock['lmms-eval']} needs filelock{devlock.read_inputs()['filelock']} (it imports "
            f"filelock._api); installed: filelock {have['filelock']}",
        )
    return found


HARNESS_PROBLEMS = harness_problems()


@pytest.fixture(autouse=True)
def harness_as_locked():
    """Each test here fails with what is missing or wrong, not with an import error deep inside lmms-eval."""
    if HARNESS_PROBLEMS:
        lines = "\n  ".join(HARNESS_PROBLEMS)
        pytest.fail(f"{lines}\n  run ./setup.sh, which installs requirements/dev.lock", pytrace=False)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmms")


@pytest.fixture(scope="session")
def task_dir(workdir) -> Path:
    return write_synthetic_task(workdir / "task", n=NUM_QUESTIONS)


@pytest.fixture(scope="session")
def model_and_processor(synthetic_model_dir):
    return load(synthetic_model_dir)


@pytest.fixture(scope="session")
def lmms_run(synthetic_model_dir, task_dir, workdir):
    """`run(name, model_args, batch_size)`: one `python -m lmms_eval` run of both tasks, cached per name."""

    @cache
    def run(name: str, drop_args: str, batch_size: int) -> dict:
        out, record = workdir / name, workdir / f"{name}.pdrop.json"
        model_args = f"pretrained={synthetic_model_dir},record={record}" + (f",{drop_args}" if drop_args else "")
        command = [sys.executable, "-m", "lmms_eval", "--model", LMMS_MODEL_NAME, "--model_args", model_args]
        command += ["--tasks", f"{TASK},{MC_TASK}", "--include_path", str(task_dir), "--batch_size", str(batch_size)]
        command += ["--device", "cpu", "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf")}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        results = sorted(out.glob("*/*_results.json"))
        # lmms-eval exits 0 even when the evaluation raised, so the results file is the real check
        assert done.returncode == 0 and results, f"lmms-eval failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        samples = {}
        for task in (TASK, MC_TASK):
            (path,) = out.glob(f"*/*_samples_{task}.jsonl")
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            samples[task] = sorted(rows, key=lambda row: row["doc_id"])
        return {
            "results": json.loads(results[0].read_text()),
            "samples": samples,
            "record": json.loads(record.read_text()),
        }

    return run


def no_drop(lmms_run) -> dict:
    return lmms_run("none_bs4", "", 4)


def pdrop(lmms_run, batch_size: int = 4) -> dict:
    return lmms_run(f"pdrop_bs{batch_size}", f"lam={LAM},stages=4", batch_size)


def answers(run: dict) -> list[str]:
    return [normalize_answer(row["filtered_resps"]) for row in run["samples"][TASK]]


def choice_scores(run: dict) -> list[list[tuple[float, bool]]]:
    """Per document, per choice: (mean NLL, greedy?) as lmms-eval logged them (it writes them as strings)."""
    out = []
    for row in run["samples"][MC_TASK]:
        pairs = [pair[0] if isinstance(pair[0], list) else pair for pair in row["filtered_resps"]]
        out.append([(float(nll), str(greedy) == "True") for nll, greedy in pairs])
    return out


def test_entry_point_registers_pdrop_hf():
    (entry,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == LMMS_MODEL_NAME]
    manifest = entry.load()()
    assert manifest.model_id == LMMS_MODEL_NAME
    assert manifest.simple_class_path == "pyramiddrop.integrations.lmms_eval.PyramidDropLMMs"


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["none", "pdrop"])
def test_scores_equal_pdrop_eval(setting, lmms_run, model_and_processor, task_dir):
    """Same questions, same settings: lmms-eval's exact match, answers, visual tokens and FLOPs equal `pdrop eval`'s."""
    model, processor = model_and_processor
    run = no_drop(lmms_run) if setting == "none" else pdrop(lmms_run)
    num_layers = model.config.get_text_config().num_hidden_layers
    config = None if setting == "none" else PyramidDropConfig.from_lambda(num_layers, 4, LAM)
    examples = load_jsonl(task_dir / "test.jsonl")
    rows, predictions = evaluate(model, processor, examples, [Setting(setting, config)], batch_size=4, progress=False)
    assert answers(run) == predictions[0]
    assert run["results"]["results"][TASK]["exact_match,none"] == pytest.approx(rows[0]["accuracy"], abs=1e-12)
    recorded = run["record"]["tasks"][TASK]
    assert recorded["requests"] == NUM_QUESTIONS
    assert recorded["visual_tokens_per_layer"] == pytest.approx(rows[0]["avg_visual_tokens"])
    assert recorded["flops_paper"] == pytest.approx(rows[0]["flops_paper"])
    assert recorded["flops_e2e"] == pytest.approx(rows[0]["flops_e2e"])
    # next to the scores in lmms-eval's own results file
    throughput = run["results"]["throughput"]
    assert throughput["avg_pdrop_flops_paper"] == pytest.approx(rows[0]["flops_paper"])
    assert throughput["avg_pdrop_visual_tokens_per_layer"] == pytest.approx(rows[0]["avg_visual_tokens"])
    if setting == "pdrop":
        assert rows[0]["avg_visual_tokens"] < 0.5 * recorded["visual_tokens"]
        assert run["record"]["settings"]["layer_list"] == config.layer_list
        assert f"lam={LAM}" in run["results"]["config"]["model_args"]


@pytest.mark.slow
def test_batch_size_1_and_4_give_the_same_answers(lmms_run):
    one, four = pdrop(lmms_run, 1), pdrop(lmms_run, 4)
    assert answers(one) == answers(four)
    for doc_one, doc_four in zip(choice_scores(one), choice_scores(four)):
        assert [greedy for _, greedy in doc_one] == [greedy for _, greedy in doc_four]
        assert [nll for nll, _ in doc_one] == pytest.approx([nll for nll, _ in doc_four], abs=1e-4)
    assert one["results"]["results"][MC_TASK]["acc,none"] == four["results"]["results"][MC_TASK]["acc,none"]


def manual_choice_nll(model, processor, example: dict, choice: str, config: PyramidDropConfig | None) -> list[float]:
    """One forward over prompt + " choice" with the labels of the choice: (NLL from the tail of the logits, loss).

    With a drop, the model is put in training mode for this forward: the engine then ranks with the token before
    the answer (the prompt's last token, as generation does) and computes the loss on the gathered labels.
    """
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(example["image"]).convert("RGB")
    inputs = processor(images=[image], text=[prompt + " " + choice], return_tensors="pt")
    target = continuation_ids(processor.tokenizer, prompt, " " + choice)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -len(target) :] = torch.tensor(target)
    assert inputs["input_ids"][0, -len(target) :].tolist() == target
    if config is not None:
        apply_pyramid_drop(model, config)
        model.train()
    try:
        with torch.no_grad():
            output = model(**inputs, labels=labels)
    finally:
        model.eval()
        if config is not None:
            remove_pyramid_drop(model)
    logits = output.logits[0, -len(target) - 1 : -1].float()  # the drop shortens the logits: index from the end
    nll = -logits.log_softmax(-1).gather(1, torch.tensor(target)[:, None]).mean()
    return [float(nll), float(output.loss)]


@pytest.mark.parametrize("setting", ["none", "pdrop"])
def test_loglikelihood_matches_a_manual_computation(setting, lmms_run, model_and_processor, task_dir):
    model, processor = model_and_processor
    text = model.config.get_text_config()
    assert text.attention_dropout == 0 and model.config.vision_config.attention_dropout == 0  # train() is exact
    run = no_drop(lmms_run) if setting == "none" else pdrop(lmms_run)
    config = None if setting == "none" else PyramidDropConfig.from_lambda(text.num_hidden_layers, 4, LAM)
    examples = load_jsonl(task_dir / "test.jsonl")
    for index in range(3):
        example = examples[index]
        scores = choice_scores(run)[index]
        for choice, (nll, _) in zip(ANSWERS[example["type"]], scores):
            assert manual_choice_nll(model, processor, example, choice, config) == pytest.approx([nll, nll], abs=2e-4)
    if setting == "pdrop":  # the drop changed what was scored
        dropped = [nll for doc in choice_scores(run) for nll, _ in doc]
        full = [nll for doc in choice_scores(no_drop(lmms_run)) for nll, _ in doc]
        assert max(abs(a - b) for a, b in zip(dropped, full)) > 1e-3


def test_drop_request_parsing_and_errors():
    request = DropRequest.from_args(layer_list="8-16-24", ratios="0.5-0.25-0.125")
    setting = request.resolve(32)
    assert (setting.method, setting.config.layer_list) == ("pdrop", [8, 16, 24])
    assert setting.config.image_token_ratio_list == [0.5, 0.25, 0.125]
    assert DropRequest.from_args(layer_list=8, ratios=0.5).resolve(32).config.layer_list == [8]
    assert DropRequest.from_args(layer_list="[8,16]", ratios="[0.5,0.25]").resolve(32).config.layer_list == [8, 16]
    assert DropRequest.from_args(lam=0.5, stages=4).resolve(32).config == PyramidDropConfig.from_lambda(32, 4, 0.5)
    for method in ("fastv", "random", "uniform", "dart", "pdrop-mean", "pdrop-original", "pdrop"):
        got = DropRequest.from_args(budget=0.33, method=method).resolve(32, 576)
        assert (got.method, got.config, got.extra) == (method, schedule_for(method, 0.33, 32, 576), {"budget": 0.33})
    assert (
        DropRequest.from_args(method="fastv", layer_list=2, ratios=0.5).resolve(32).config.position_mode == "original"
    )
    assert DropRequest.from_args(lam=0.5, position_mode="original").resolve(32).config.position_mode == "original"
    assert DropRequest.from_args(lam=0.5).resolve(28, position_modes=("original",)).config.position_mode == "original"
    assert DropRequest.from_args().resolve(32).config is None
    assert DropRequest.from_args(method="none").resolve(32).config is None
    errors = {
        "layer_list and ratios go together": {"layer_list": "8-16"},
        "give one schedule": {"lam": 0.5, "budget": 0.3},
        "needs a schedule": {"method": "fastv"},
        "is unknown": {"method": "fastv2", "lam": 0.5},
        "means no drop": {"method": "none", "lam": 0.5},
        "not a list of integers": {"layer_list": "8-x", "ratios": "0.5-0.25"},
        "strictly decreasing": {"layer_list": "8-16", "ratios": "0.5-0.5"},
        "drops once": {"method": "fastv", "layer_list": "2-4", "ratios": "0.5-0.25"},
        "sets position_mode": {"method": "pdrop-original", "lam": 0.5, "position_mode": "compact"},
        "budget must be in (0, 1)": {"budget": 3},
        "stages only applies with lam": {"stages": 4},
        "position_mode must be one of": {"lam": 0.5, "position_mode": "sideways"},
    }
    for message, args in errors.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            DropRequest.from_args(**args)
    with pytest.raises(ValueError, match="outside"):
        DropRequest.from_args(layer_list="8-40", ratios="0.5-0.25").resolve(32)


def test_bad_model_args_say_what_to_change(synthetic_model_dir):
    from pyramiddrop.integrations.lmms_eval import PyramidDropLMMs

    with pytest.raises(ValueError, match="unknown model_args lamda; the valid ones are"):
        PyramidDropLMMs.create_from_arg_string(f"pretrained={synthetic_model_dir},lamda=0.5")
    with pytest.raises(ValueError, match="add pretrained="):
        PyramidDropLMMs.create_from_arg_string("lam=0.5")
    with pytest.raises(ValueError, match="outside"):  # checked against the model's depth at load time
        PyramidDropLMMs.create_from_arg_string(f"pretrained={synthetic_model_dir},layer_list=4-30,ratios=0.5-0.25")
