"""Per-request options on a PyramidDrop engine: prompt logprobs and beam search are refused at request validation
with a message that names the option (and the engine serves exactly afterwards); the logprobs of generated tokens
and n > 1 completions equal the transformers engine's. On the same model without a schedule, prompt logprobs and
beam search work as in stock vLLM."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.entrypoints.llm", reason="needs the vLLM environment: ./setup-vllm.sh")

from engines import engine, greedy, tokens  # noqa: E402
from reference import processor_inputs, requests, transformers_greedy, transformers_model  # noqa: E402
from tiny_llava_dir import save_tiny_llava  # noqa: E402

from pyramiddrop import PyramidDropConfig  # noqa: E402

MAX_NEW = 8
CONFIG = PyramidDropConfig(layer_list=[1, 2], image_token_ratio_list=[0.5, 0.25])
WORDS_REGEX = "(w[4-9]){3}"  # the tiny tokenizer's words w4 ... w9 are ids 4 ... 9 (no spaces in its tokens)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def expected(model_dir):
    """The transformers engine's greedy tokens and their logprobs, per request."""
    return transformers_greedy(model_dir, CONFIG, requests(), MAX_NEW)


@pytest.fixture(scope="module")
def pyramid_llm(model_dir):
    """max_num_batched_tokens=64 is below every prompt with an image (70-150 tokens): PyramidDrop raises it to
    max_model_len (chunking would split a prompt's visual tokens from its last token), so prompts still run."""
    with engine(model_dir, CONFIG, max_num_batched_tokens=64) as llm:
        yield llm


def test_prompt_logprobs_are_refused_and_the_engine_still_serves(pyramid_llm, expected):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    with pytest.raises(VLLMValidationError, match="PyramidDrop cannot answer prompt_logprobs exactly") as error:
        pyramid_llm.generate(requests(), params)
    assert "Remove prompt_logprobs from the request" in str(error.value)
    assert "serve the model without `pyramid_drop`" in str(error.value)
    assert tokens(pyramid_llm.generate(requests(), greedy(MAX_NEW))) == [tokens for tokens, _ in expected]


def test_logprobs_of_generated_tokens_match_transformers(pyramid_llm, expected):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=2)
    outputs = pyramid_llm.generate(requests(), params)
    assert tokens(outputs) == [tokens for tokens, _ in expected]
    for output, (_, logprobs) in zip(outputs, expected):
        completion = output.outputs[0]
        got = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(logprobs), rtol=0, atol=1e-3)


def test_n_completions_match_transformers(pyramid_llm, expected):
    """n > 1 needs temperature > 0 in vLLM; top_k=1 makes each of the n completions greedy."""
    from vllm import SamplingParams

    params = SamplingParams(n=3, max_tokens=MAX_NEW, temperature=1.0, top_k=1, ignore_eos=True, seed=0)
    outputs = pyramid_llm.generate(requests(), params)
    got = [[list(completion.token_ids) for completion in output.outputs] for output in outputs]
    assert got == [[tokens] * 3 for tokens, _ in expected]


def transformers_structured(model_dir, config) -> list[list[int]]:
    """The transformers engine's greedy tokens under WORDS_REGEX's masks: ids 4-9 three times, then the end token
    (prefix_allowed_tokens_fn; the tiny model's generation config has no end token, so 4 tokens)."""
    processor, model = transformers_model(model_dir, config)
    out = []
    for request in requests():
        batch = processor_inputs(processor, request)
        start = batch["input_ids"].shape[1]

        def allowed(row, ids, start=start):
            return list(range(4, 10)) if ids.shape[0] - start < 3 else [processor.tokenizer.eos_token_id]

        generated = model.generate(**batch, max_new_tokens=4, do_sample=False, prefix_allowed_tokens_fn=allowed)
        out.append(generated[0, start:].tolist())
    return out


def test_structured_outputs_match_transformers(pyramid_llm, model_dir):
    """vLLM masks the sampled row with the grammar of a regex (three words of w4-w9); the transformers engine gets
        the same masks. The masked choices still depend on the drops (the model without PyramidDrop differs), and vLLM
    stops at the end token by itself (max_tokens=6)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    expected = transformers_structured(model_dir, CONFIG)
    assert expected != transformers_structured(model_dir, None)
    params = SamplingParams(
        max_tokens=6, temperature=0.0, structured_outputs=StructuredOutputsParams(regex=WORDS_REGEX)
    )
    assert tokens(pyramid_llm.generate(requests(), params)) == expected


def test_beam_search_is_refused(pyramid_llm):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import BeamSearchParams

    with pytest.raises(VLLMValidationError, match="PyramidDrop cannot serve beam search exactly") as error:
        pyramid_llm.beam_search(requests()[:1], BeamSearchParams(beam_width=2, max_tokens=4))
    assert "serve the model without `pyramid_drop`" in str(error.value)


def test_without_pyramid_drop_prompt_logprobs_and_beam_search_work(model_dir):
    """Stock vLLM's prompt logprobs equal the transformers model's (no PyramidDrop), and beam search runs."""
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    request = requests()[0]
    processor, model = transformers_model(model_dir, None)
    batch = processor_inputs(processor, request)
    with torch.no_grad():
        logits = model(**batch).logits[0]
    ids = batch["input_ids"][0]
    reference = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
    with engine(model_dir) as llm:
        output = llm.generate([request], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
        beams = llm.beam_search([request], BeamSearchParams(beam_width=2, max_tokens=4))
    assert output.prompt_token_ids == ids.tolist()
    got = [step[token].logprob for step, token in zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:])]
    torch.testing.assert_close(torch.tensor(got), reference, rtol=0, atol=1e-3)
    assert len(beams[0].sequences) == 2
