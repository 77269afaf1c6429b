"""Engine-start checks: every refusal with its message (raised while vLLM builds its config, before any weights
load), the options PyramidDrop turns off, and a model without `pyramid_drop` left exactly as configured."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs the vLLM environment: ./setup-vllm.sh")

from tiny_llava_dir import save_tiny_llava  # noqa: E402
from tiny_models import text_fields  # noqa: E402
from tiny_processors import word_tokenizer  # noqa: E402

SCHEDULE = {"layer_list": [1], "image_token_ratio_list": [0.5]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


def engine_config(model_dir, schedule=SCHEDULE, **options):
    from vllm.engine.arg_utils import EngineArgs

    overrides = {"pyramid_drop": schedule} if schedule is not None else {}
    settings = dict(dtype="float32", max_model_len=512, enforce_eager=True)
    return EngineArgs(model=str(model_dir), hf_overrides=overrides, **(settings | options)).create_engine_config()


REFUSED = {
    "speculative decoding": (
        dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}),
        "remove speculative_config / --speculative-config",
    ),
    "tensor parallel": (dict(tensor_parallel_size=2), "set tensor_parallel_size=1 / --tensor-parallel-size 1"),
    "pipeline parallel": (dict(pipeline_parallel_size=2), "set pipeline_parallel_size=1 / --pipeline-parallel-size 1"),
    "lora": (dict(enable_lora=True), "remove enable_lora / --enable-lora"),
    "cuda graphs": (
        dict(compilation_config={"cudagraph_mode": "FULL"}),
        "CUDA graphs (each step's kept-token count differs from the captured shapes): set enforce_eager=True",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_options_name_the_flag(model_dir, name):
    options, message = REFUSED[name]
    with pytest.raises(Exception, match="PyramidDrop cannot serve this engine exactly") as error:
        engine_config(model_dir, **options)
    assert message in str(error.value)


def test_the_v2_model_runner_is_refused(model_dir, monkeypatch):
    """The plugin learns each step's requests from the V1 runner; under V2 it would drop nothing, silently."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(
        Exception, match="PyramidDrop cannot serve this engine exactly: vLLM's V2 model runner"
    ) as error:
        engine_config(model_dir)
    assert "set VLLM_USE_V2_MODEL_RUNNER=0" in str(error.value)


def test_the_same_options_pass_without_pyramid_drop(model_dir):
    """The refusals come from PyramidDrop: without a schedule vLLM accepts the same option (LoRA here)."""
    assert engine_config(model_dir, schedule=None, enable_lora=True).lora_config is not None


def test_other_methods_are_refused(model_dir):
    with pytest.raises(Exception, match="PyramidDrop in vLLM ranks with pdrop, fastv; pyramid_drop.method is .random."):
        engine_config(model_dir, schedule=SCHEDULE | {"method": "random"})


def test_a_schedule_deeper_than_the_model_is_refused(model_dir):
    with pytest.raises(Exception, match=r"layer_list entry 4 is outside \[0, 3\]"):
        engine_config(model_dir, schedule={"layer_list": [4], "image_token_ratio_list": [0.5]})


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**text_fields(2, hidden_size=128, intermediate_size=256))).save_pretrained(tmp_path)
    word_tokenizer([]).save_pretrained(tmp_path)
    supported = (
        r"LLaVA-1.5 \(LlavaForConditionalGeneration\), LLaVA-NeXT \(LlavaNextForConditionalGeneration\), "
        r"Qwen2-VL \(Qwen2VLForConditionalGeneration\), Qwen2.5-VL \(Qwen2_5_VLForConditionalGeneration\)"
    )
    with pytest.raises(Exception, match=rf"serves {supported}; this model is LlamaForCausalLM"):
        engine_config(tmp_path)


def test_prefix_caching_and_chunked_prefill_are_turned_off(model_dir):
    """Also when a user asks for them (--enable-prefix-caching --enable-chunked-prefill): turned off and logged,
    never refused, so that `vllm serve DIR` works with any defaults (docs/serving.md)."""
    options = dict(max_num_batched_tokens=256, enable_prefix_caching=True, enable_chunked_prefill=True)
    config = engine_config(model_dir, **options)
    assert not config.cache_config.enable_prefix_caching
    assert not config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens >= 512  # the longest prompt fits one step
    # and so do its images' encoder inputs (else the scheduler runs the text before an image alone)
    assert config.scheduler_config.max_num_encoder_input_tokens >= 512
    assert config.scheduler_config.encoder_cache_size >= 512


def test_a_model_without_pyramid_drop_keeps_its_options(model_dir):
    config = engine_config(model_dir, schedule=None, max_num_batched_tokens=256)
    assert config.cache_config.enable_prefix_caching
    assert config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens == 256
