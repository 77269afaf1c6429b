"""Intervals and paired tests (`pyramiddrop.stats`), the rows' paired fields, the depth profile and horizon."""

import math

import pytest

from pyramiddrop.tools.evaluate import add_paired_differences, excludes_zero, format_difference, format_table
from pyramiddrop.tools.stats import mcnemar_exact, paired_bootstrap_diff, wilson_interval
from pyramiddrop.tools.study import depth_profile, horizon_layer


def test_wilson_interval_of_8_of_10_matches_the_formula_by_hand():
    """z = 1.959964 (z² = 3.841459), p = 0.8, n = 10:
    denominator 1 + z²/n = 1.3841459; center (p + z²/2n) / denominator = 0.9920729 / 1.3841459 = 0.716741;
    half z/denominator · sqrt(p(1-p)/n + z²/4n²) = 1.415995 · sqrt(0.016 + 0.0096036) = 0.226579;
    interval (0.490162, 0.943320)."""
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490162, abs=1e-5) and high == pytest.approx(0.943320, abs=1e-5)


def test_wilson_interval_edges_and_confidence():
    low, high = wilson_interval(0, 10)  # 0 %: lower end exactly 0, upper z²/(n + z²) = 3.841459/13.841459
    assert low == 0.0 and high == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    assert wilson_interval(10, 10)[1] == 1.0  # never above 1
    assert wilson_interval(10, 10)[0] == pytest.approx(10 / 13.841459, abs=1e-6)
    wide, narrow = wilson_interval(80, 100, 0.99), wilson_interval(80, 100, 0.95)
    assert wide[0] < narrow[0] < 0.8 < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="at least one question"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, 10\]"):
        wilson_interval(11, 10)


def test_mcnemar_exact_by_hand():
    # 1 question only a gets right, 6 only b, 3 both, 2 neither: p = 2 · (C(7,0) + C(7,1)) / 2^7 = 16/128.
    a = [1] + [0] * 6 + [1] * 3 + [0] * 2
    b = [0] + [1] * 6 + [1] * 3 + [0] * 2
    assert mcnemar_exact(a, b) == 0.125 and mcnemar_exact(b, a) == 0.125
    assert mcnemar_exact([0] * 5, [1] * 5) == 2 / 2**5  # 0 vs 5 discordant: 2 · C(5,0) / 32
    assert mcnemar_exact([1, 0, 1, 0], [0, 1, 0, 1]) == 1.0  # 2 vs 2: 2 · 11/16 capped at 1
    assert mcnemar_exact([1, 1, 0], [1, 1, 0]) == 1.0  # no discordant pair
    tail = sum(math.comb(1000, k) for k in range(451))  # large n stays exact: 450 vs 550
    assert mcnemar_exact([1] * 450 + [0] * 550, [0] * 450 + [1] * 550) == pytest.approx(2 * tail / 2**1000)


def test_paired_bootstrap_identical_constant_and_clear_differences():
    same = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    assert paired_bootstrap_diff(same, same) == (0.0, 0.0, 0.0)
    # every pair differs by exactly 1: every resample's mean difference is 1
    assert paired_bootstrap_diff([1] * 10, [0] * 10) == (1.0, 1.0, 1.0)
    a, b = [1] * 100, [1] * 50 + [0] * 50  # 50 points better: the interval excludes 0 and holds 0.5
    diff, low, high = paired_bootstrap_diff(a, b, resamples=2000, seed=3)
    assert diff == 0.5 and 0 < low < 0.5 < high < 1
    # The resampled mean of 100 pairs, half +1 and half 0, has sd sqrt(0.25 / 100) = 0.05: about ±1.96 sd.
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert paired_bootstrap_diff(b, a, seed=3) == pytest.approx((-0.5, -high, -low))  # same resamples, negated


def test_paired_bootstrap_is_deterministic_per_seed():
    a = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1] * 5
    b = [1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1] * 5
    assert paired_bootstrap_diff(a, b, 500, seed=7) == paired_bootstrap_diff(a, b, 500, seed=7)
    scores = [(i * 0.37) % 1 for i in range(60)]  # non-binary scores: the ends move with the resamples
    assert paired_bootstrap_diff(scores, b, 500, seed=7) != paired_bootstrap_diff(scores, b, 500, seed=8)
    with pytest.raises(ValueError, match="same questions: got 3 and 2"):
        paired_bootstrap_diff([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="same questions"):
        mcnemar_exact([1], [1, 0])


def _row(method: str, correct: list[int], **settings) -> dict:
    n = len(correct)
    low, high = wilson_interval(sum(correct), n)
    return {
        "method": method,
        "settings": settings or {"visual_tokens": "all"},
        "accuracy": sum(correct) / n,
        "ci_low": low,
        "ci_high": high,
        "retention": None,
        "flops_paper": 1.0,
        "flops_e2e": 1.0,
        "avg_visual_tokens": 64.0,
        "prefill_ms": 1.0,
        "n": n,
        "correct": correct,
    }


def test_rows_get_paired_fields_and_the_table_marks_clear_differences():
    rows = [_row("none", [1] * 20), _row("pdrop", [1] * 10 + [0] * 10), _row("random", [1] * 19 + [0])]
    add_paired_differences(rows, "none")
    assert rows[0]["diff_vs_none"] is None and rows[0]["mcnemar_p_vs_none"] is None
    assert rows[1]["diff_vs_none"] == -0.5 and rows[1]["mcnemar_p_vs_none"] == 2 / 2**10  # 0 vs 10 discordant
    assert rows[2]["mcnemar_p_vs_none"] == 1.0  # 0 vs 1: 2 · 1/2 = 1
    assert excludes_zero(rows[1]["diff_vs_none_ci"]) and not excludes_zero(rows[2]["diff_vs_none_ci"])
    assert rows[2]["diff_vs_none_ci"] == pytest.approx([-0.15, 0.0])  # 2.5 % of resamples hold 3 of its miss
    add_paired_differences(rows, "pdrop")
    assert rows[0]["diff_vs_pdrop"] == 0.5 and rows[1]["diff_vs_pdrop_ci"] is None
    add_paired_differences(rows, "fastv")  # no such row: nothing added
    assert "diff_vs_fastv" not in rows[0]

    low, high = (100 * x for x in rows[1]["diff_vs_none_ci"])
    assert format_difference(-0.5, rows[1]["diff_vs_none_ci"]) == f"-50.0 [{low:+.1f}, {high:+.1f}]*"
    lines = format_table(rows).splitlines()
    assert lines[0] == "20 questions, the same for every row"
    assert "Δ none" in lines[1] and "Δ pdrop" in lines[1]
    assert lines[3].split()[:4] == ["none", "all", "visual", "tokens"]
    assert "100.0%" in lines[3] and "[83.9, 100.0]" in lines[3]  # Wilson 20/20: 20 / (20 + z²) = 0.839
    assert lines[4].split()[-6:] == ["-50.0", f"[{low:+.1f},", f"{high:+.1f}]*", "0.00195", "-", "-"]
    assert "-5.0 [-15.0, +0.0] " in lines[5] and "*" not in lines[5].split("]")[1]  # contains 0: no mark
    assert "paired-bootstrap interval (2000 resamples" in lines[-1] and "McNemar" in lines[-1]


def _profile_rows(losses: dict[tuple[int, float], list[int]]) -> list[dict]:
    """Study rows: no drop right on all 10 questions, each (depth, ratio) wrong on the questions listed."""
    rows = [_row("none", [1] * 10)]
    for (depth, ratio), wrong in losses.items():
        rows.append(_row("random", [0 if i in wrong else 1 for i in range(10)], depth=depth, keep_ratio=ratio))
    add_paired_differences(rows, "none")
    return rows


def test_depth_profile_and_horizon_layer():
    everything = list(range(10))
    rows = _profile_rows(
        {
            (1, 0.1): everything,  # loss 100 points, [1, 1]: excludes 0
            (2, 0.1): [],  # 0 [0, 0]
            (4, 0.1): everything[:5],  # 50 points: excludes 0
            (6, 0.1): [],
            (1, 0.5): [3],  # 10 points, interval [0, 0.3]: contains 0
            (2, 0.5): [],
            (4, 0.5): [],
            (6, 0.5): [],
        }
    )
    profile = depth_profile(rows)
    assert [(e["keep_ratio"], e["depth"]) for e in profile][:4] == [(0.1, 1), (0.1, 2), (0.1, 4), (0.1, 6)]
    first = profile[0]
    assert first["loss"] == 1.0 and first["loss_ci"] == [1.0, 1.0] and first["accuracy"] == 0.0
    assert first["mcnemar_p"] == 2 / 2**10 and first["accuracy_ci"] == [rows[1]["ci_low"], rows[1]["ci_high"]]
    assert profile[1]["loss"] == 0.0 and profile[1]["loss_ci"] == [0.0, 0.0]  # not -0.0
    assert str(profile[1]["loss"]) == "0.0"
    # keep 0.1: depth 4 excludes 0, so the horizon is 6 (the dip at depth 2 does not count); keep 0.5: from 1.
    assert horizon_layer(profile, 0.1) == 6 and horizon_layer(profile, 0.5) == 1
    deepest_fails = depth_profile(_profile_rows({(1, 0.1): [], (2, 0.1): everything}))
    assert horizon_layer(deepest_fails, 0.1) is None
    with pytest.raises(ValueError, match=r"keep ratio 0.25 is not in the study \(ratios: \[0.1\]\)"):
        horizon_layer(deepest_fails, 0.25)
