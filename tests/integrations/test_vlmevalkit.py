"""`PyramidDropVLM.generate_inner` on VLMEvalKit-style messages (VLMEvalKit itself is not installed here)."""

from __future__ import annotations

import pytest

from pyramiddrop import PyramidDropConfig
from pyramiddrop.integrations.vlmevalkit import VLMEVALKIT_AVAILABLE, PyramidDropVLM, register
from pyramiddrop.settings import Setting
from pyramiddrop.synthetic.data import export_jsonl, make_split
from pyramiddrop.synthetic.model import load
from pyramiddrop.tools.answers import normalize_answer
from pyramiddrop.tools.evaluate import evaluate
from pyramiddrop.tools.inputs import load_jsonl


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[dict]:
    return load_jsonl(export_jsonl(make_split("test", 8), tmp_path_factory.mktemp("vlmevalkit")))


def test_generate_inner_answers_as_pdrop_eval(synthetic_model_dir, examples, tmp_path):
    record = tmp_path / "record.json"
    vlm = PyramidDropVLM(
        str(synthetic_model_dir), lam=0.5, stages=4, max_new_tokens=4, device="cpu", record=str(record)
    )
    messages = [
        [{"type": "image", "value": example["image"]}, {"type": "text", "value": example["question"]}]
        for example in examples
    ]
    got = [normalize_answer(vlm.generate_inner(message, dataset="synthetic")) for message in messages]
    assert normalize_answer(vlm.generate(messages[0], dataset="other")) == got[0]  # the base class's entry point

    model, processor = load(synthetic_model_dir)
    config = PyramidDropConfig.from_lambda(model.config.get_text_config().num_hidden_layers, 4, 0.5)
    rows, predictions = evaluate(model, processor, examples, [Setting("pdrop", config)], batch_size=1, progress=False)
    assert got == predictions[0]
    summary = vlm.summary()
    assert summary["settings"]["layer_list"] == config.layer_list
    assert summary["tasks"]["synthetic"]["visual_tokens_per_layer"] == pytest.approx(rows[0]["avg_visual_tokens"])
    assert summary["tasks"]["synthetic"]["flops_paper"] == pytest.approx(rows[0]["flops_paper"])
    assert record.exists()


def test_text_only_and_interleaved_messages(synthetic_model_dir, examples):
    vlm = PyramidDropVLM(str(synthetic_model_dir), max_new_tokens=2, device="cpu")  # no schedule: the unmodified model
    assert isinstance(vlm.generate_inner([{"type": "text", "value": "how many circles are there?"}]), str)
    message = [
        {"type": "text", "value": "look:"},
        {"type": "image", "value": examples[0]["image"]},
        {"type": "text", "value": "is there a red square?"},
        {"type": "text", "value": "answer yes or no."},
    ]
    images, prompt = vlm.message_to_inputs(message)
    assert len(images) == 1
    assert prompt == "USER: look:<image>\nis there a red square?\nanswer yes or no. ASSISTANT:"
    assert isinstance(vlm.generate_inner(message), str)
    assert vlm.summary()["method"] == "none"
    with pytest.raises(NotImplementedError, match="video"):
        vlm.generate_inner([{"type": "video", "value": "clip.mp4"}])


@pytest.mark.skipif(VLMEVALKIT_AVAILABLE, reason="checks the message shown without VLMEvalKit")
def test_register_needs_vlmevalkit():
    with pytest.raises(ImportError, match="needs VLMEvalKit"):
        register("x", model_path="y")
