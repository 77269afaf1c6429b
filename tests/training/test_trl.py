"""TRL's SFTTrainer on the embedded model through TRL's own vision-language collator, with and without PyramidDrop
(`PyramidDropSFTTrainer`, the model's own loss): assistant-only and completion-only losses rank with the token
before each answer span; TRL's fused loss and a whole-sequence loss are refused with clear errors."""

import pytest
import torch

from pyramiddrop import PyramidDropConfig, apply_pyramid_drop, get_drop_record
from pyramiddrop.scoring import SCORERS, register_scorer
from pyramiddrop.synthetic.data import build_prompt, make_example
from pyramiddrop.synthetic.model import NUM_VISUAL_TOKENS, TRAINING_CHAT_TEMPLATE, load, require_embedded_model
from pyramiddrop.synthetic.vqa import conversations

trl = pytest.importorskip("trl", reason="the trl extra: pip install 'pyramiddrop[trl]'")
datasets = pytest.importorskip("datasets")

SEEN: dict = {}


@register_scorer("capture_trl_queries_for_tests")
def capture(inputs):
    if inputs.stage == 1:
        SEEN["query_mask"] = inputs.query_mask.clone()
    return SCORERS["pdrop"](inputs)


def trainer(tmp_path, rows, pyramid_drop: PyramidDropConfig | None, trainer_class=None, **config):
    from pyramiddrop.integrations.trl import PyramidDropSFTTrainer

    model, processor = load(require_embedded_model())
    processor.chat_template = TRAINING_CHAT_TEMPLATE  # {% generation %} markers: TRL's assistant mask
    model.model.vision_tower.requires_grad_(False)
    if pyramid_drop is not None:
        apply_pyramid_drop(model, pyramid_drop)

    def keep_labels(module, args, kwargs):  # prepended: sees the labels before PyramidDrop takes them
        SEEN["labels"] = kwargs["labels"].clone()

    model.register_forward_pre_hook(keep_labels, with_kwargs=True, prepend=True)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=len(rows),
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        max_length=None,  # TRL's defaults otherwise: bf16 autocast and gradient checkpointing
        **config,
    )
    return (trainer_class or PyramidDropSFTTrainer)(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor
    )


def answer_starts(labels: torch.Tensor) -> torch.Tensor:
    """The token right before each span of supervised labels."""
    answer = labels != -100
    return torch.cat([answer[:, 1:] & ~answer[:, :-1], torch.zeros_like(answer[:, :1])], dim=1)


PDROP = PyramidDropConfig.from_lambda(8, 4, 0.5, method="capture_trl_queries_for_tests")


def test_assistant_only_loss_ranks_with_one_query_per_answer(tmp_path):
    rows = conversations(3, turns=3, start=50)
    run = trainer(tmp_path, rows, PDROP, assistant_only_loss=True)
    weights = run.model.lm_head.weight.detach().clone()
    result = run.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(weights, run.model.lm_head.weight)
    labels, queries = SEEN["labels"], SEEN["query_mask"]
    assert torch.equal(queries, answer_starts(labels))
    assert queries.sum(1).tolist() == [3, 3, 3]  # three answers per sample, three queries
    tokenizer = run.processing_class.tokenizer
    answers = {tokenizer.decode(row[row != -100]) for row in labels}
    assert all(text.count("</s>") == 3 for text in answers)  # each answer span is an answer and its </s>
    kept = get_drop_record(run.model).kept_visual_indices
    assert [len(stage) for stage in kept[0]] == [NUM_VISUAL_TOKENS, 72, 36, 18]


def test_completion_only_loss_ranks_with_the_last_prompt_token(tmp_path):
    examples = [make_example(0, index) for index in range(60, 63)]
    rows = [
        {"images": [e.image()], "prompt": build_prompt(e.question), "completion": f" {e.answer}</s>"} for e in examples
    ]
    run = trainer(tmp_path, rows, PDROP)  # prompt-completion data: completion_only_loss is TRL's default
    run.train()
    labels, queries = SEEN["labels"], SEEN["query_mask"]
    assert torch.equal(queries, answer_starts(labels)) and queries.sum(1).tolist() == [1, 1, 1]
    tokenizer = run.processing_class.tokenizer
    supervised = sorted(tokenizer.decode(row[row != -100]) for row in labels)  # the Trainer shuffles the rows
    assert supervised == sorted(f"{example.answer} </s>" for example in examples)


def test_sft_trainer_without_pyramid_drop_gives_the_same_first_loss(tmp_path):
    """Ratio 1.0 (nothing dropped, labels gathered by the engine) logs the plain model's first loss."""
    rows = conversations(2, turns=2, start=70)
    losses = []
    for config in (None, PyramidDropConfig([2], [1.0])):
        run = trainer(tmp_path, rows, config, assistant_only_loss=True)
        run.train()
        losses.append(next(entry["loss"] for entry in run.state.log_history if "loss" in entry))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_a_loss_on_the_whole_sequence_is_refused(tmp_path):
    run = trainer(tmp_path, conversations(2, turns=1, start=80), PDROP)  # labels = every non-padding token
    with pytest.raises(ValueError, match=rf"labels on {2 * NUM_VISUAL_TOKENS} visual-token positions"):
        run.train()


def test_plain_sft_trainer_is_refused_with_the_class_to_use(tmp_path):
    run = trainer(tmp_path, conversations(2, turns=1, start=90), PDROP, trl.SFTTrainer, assistant_only_loss=True)
    with pytest.raises(ValueError, match="train with pyramiddrop.integrations.trl.PyramidDropSFTTrainer"):
        run.train()
