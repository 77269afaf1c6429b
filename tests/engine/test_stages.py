"""The pure stage functions (`pyramiddrop.engine.stages`) against plain per-row transcriptions on random inputs."""

import pytest
import torch

from pyramiddrop.engine import stages


def _random_layout(generator, batch=4, length=40, groups_per_row=2):
    """A padded batch with visual tokens in several groups per row (and a row with none)."""
    attention_mask = torch.ones(batch, length, dtype=torch.bool)
    for row in range(batch):
        attention_mask[row, : int(torch.randint(0, 8, (1,), generator=generator))] = False  # left padding
    pool = attention_mask & (torch.rand(batch, length, generator=generator) < 0.6)
    pool[-1] = False  # a text-only row
    frames = torch.randint(0, groups_per_row, (batch, length), generator=generator) + 10 * torch.arange(batch)[:, None]
    frames = frames.masked_fill(~pool, -1)
    return attention_mask, pool, frames


def _loop_top_per_group(scores, group, keep):
    selected = torch.zeros_like(group, dtype=torch.bool)
    for g in range(keep.numel()):
        rows, cols = (group == g).nonzero(as_tuple=True)
        order = sorted(range(len(cols)), key=lambda i: (-float(scores[rows[i], cols[i]]), int(cols[i])))
        for i in order[: int(keep[g])]:
            selected[rows[i], cols[i]] = True
    return selected


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("per_frame", [False, True])
def test_groups_keep_counts_and_top_per_group_match_a_loop(seed, per_frame):
    generator = torch.Generator().manual_seed(seed)
    attention_mask, pool, frames = _random_layout(generator)
    groups = stages.ranking_groups(pool, frames, per_frame=per_frame)
    for g in range(groups.size.numel()):  # each group lies in one row and counts its tokens
        members = groups.index == g
        assert int(members.sum()) == int(groups.size[g])
        assert members.any(1).nonzero().flatten().tolist() == [int(groups.row[g])]
    query = stages.query_rows(attention_mask, pool)
    stage0 = stages.first_stage(attention_mask, torch.arange(40).expand(4, 40), pool, groups, query)
    keep = stages.keep_counts(stage0, groups, 0.3)
    assert keep.tolist() == [max(1, int(int(n) * 0.3)) for n in groups.size]
    scores = torch.randint(0, 5, pool.shape, generator=generator).float()  # ties: the earlier token wins
    assert torch.equal(
        stages.top_per_group(scores, groups.index, keep), _loop_top_per_group(scores, groups.index, keep)
    )


def test_keep_counts_leave_a_group_without_query_whole():
    attention_mask = torch.ones(2, 6, dtype=torch.bool)
    pool = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    groups = stages.ranking_groups(pool)
    query = torch.zeros(2, 6, dtype=torch.bool)
    query[0, -1] = True  # row 1 has no query (a training sample without an answer)
    stage0 = stages.first_stage(attention_mask, torch.arange(6).expand(2, 6), pool, groups, query)
    assert stages.keep_counts(stage0, groups, 0.5).tolist() == [2, 4]


def test_query_rows():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    visual = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert stages.query_rows(mask, visual).nonzero().tolist() == [[0, 5], [1, 5]]
    assert stages.query_rows(mask, visual, prompt_length=4).nonzero().tolist() == [[0, 3], [1, 3]]
    assert stages.query_rows(mask, visual, instruction_mean=True).sum(1).tolist() == [2, 4]
    answers = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    assert stages.query_rows(mask, visual, answer_mask=answers).nonzero().tolist() == [[0, 3], [1, 1], [1, 3]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("position_mode", ["compact", "original"])
@pytest.mark.parametrize("mrope", [False, True])
@pytest.mark.parametrize("keys", [None, "float", "int"])
def test_drop_stage_matches_a_loop(seed, position_mode, mrope, keys):
    """`order` lays the kept tokens out by ascending key (ties: the earlier slot), float keys (SparseVLM's moves) or
    integer ones (`score_order`'s permutations); compact positions count in the laid-out order, original ones
    travel with their tokens."""
    generator = torch.Generator().manual_seed(seed)
    attention_mask, pool, frames = _random_layout(generator)
    batch, length = pool.shape
    groups = stages.ranking_groups(pool)
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    if mrope:  # a leading axis of 3, gathered along the sequence
        positions = torch.stack([positions, positions * 2, positions * 3])
    query = stages.query_rows(attention_mask, pool)
    stage0 = stages.first_stage(attention_mask, positions, pool, groups, query)
    keep = stages.keep_counts(stage0, groups, 0.5)
    selected = stages.top_per_group(torch.rand(batch, length, generator=generator), groups.index, keep)
    order = None
    if keys == "float":  # rounded: ties
        order = (torch.rand(batch, length, generator=generator) * 8).round() / 2
    elif keys == "int":
        order = stages.score_order(torch.rand(batch, length, generator=generator), groups.index, selected)
    stage, index = stages.drop_stage(stage0, selected, position_mode, order)
    hidden = torch.randn(batch, length, 3, generator=generator)
    gathered = stages.gather_tokens(hidden, index)
    new_length = stage.attention_mask.shape[1]
    for row in range(batch):
        kept = [i for i in range(length) if attention_mask[row, i] and (not pool[row, i] or selected[row, i])]
        assert new_length >= len(kept)
        real = slice(new_length - len(kept), new_length)  # right-aligned, filler on the left
        assert stage.attention_mask[row].tolist() == [False] * (new_length - len(kept)) + [True] * len(kept)
        laid = kept if order is None else sorted(kept, key=lambda i: (float(order[row, i]), i))
        assert stage.source_index[row, real].tolist() == laid
        assert torch.equal(gathered[row, real], hidden[row, laid])
        assert stage.pool_index[row, real].tolist() == stage0.pool_index[row, laid].tolist()
        assert int(stage.dropped[row]) == int(attention_mask[row].sum()) - len(kept)
        expected = positions[..., row, kept if position_mode == "compact" else laid]
        if position_mode == "compact":  # the kept slots' compact positions, in laid-out order
            removed_before = torch.tensor(
                [
                    int((attention_mask[row, :i] & ~(torch.isin(torch.arange(i), torch.tensor(kept)))).sum())
                    for i in kept
                ]
            )
            expected = expected - removed_before
        assert torch.equal(stage.positions[..., row, real], expected)
    with pytest.raises(ValueError, match="position_mode must be one of"):
        stages.drop_stage(stage0, selected, "shifted")
