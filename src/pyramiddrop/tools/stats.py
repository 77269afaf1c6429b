"""Intervals and tests for accuracies measured on a finite set of questions.

On 1000 questions an accuracy is uncertain by a few points, and two settings that differ by one point may not
differ at all. These three functions say how much of a number is noise. They take per-question correctness
(0/1, one entry per question, in the same question order for paired comparisons) and need only the standard
library and torch, so the core gains no dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from statistics import NormalDist

import torch


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion `successes / n`.

    Wilson rather than the normal approximation p ± z·sqrt(p(1-p)/n): that one collapses to a zero-width
    interval at 0 % or 100 % (which the embedded model scores) and can leave [0, 1]; Wilson stays inside and
    keeps close to its nominal coverage for small n and extreme p.
    """
    if n <= 0:
        raise ValueError(f"an interval needs at least one question, got n = {n}.")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 and n the formula's ends are exactly 0 and 1; rounding would leave 1e-17 or 0.9999999.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(a) != len(b):
        raise ValueError(f"paired statistics need the same questions: got {len(a)} and {len(b)} answers.")
    if len(a) == 0:
        raise ValueError("paired statistics need at least one question.")
    return torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """`mean(a) - mean(b)` and its percentile bootstrap interval, resampling questions (pairs) together.

    Paired because both settings answered the same questions: resampling the pairs keeps the question
    difficulty shared by both, so the interval is far narrower than one built from two separate accuracies.
    The resampled means are exact multiples of 1/n; the interval's ends are linear-interpolated percentiles
    (numpy's default). Deterministic for a given `seed`; identical vectors give (0, 0, 0).
    """
    first, second = _paired(a, b)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}.")
    difference = first - second
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(difference), (resamples, len(difference)), generator=generator)
    means = difference[index].mean(dim=1)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return float(difference.mean()), low, high


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value: are `a` and `b` right equally often on the questions where they differ?

    Only the discordant pairs carry information (b01: `a` right and `b` wrong, b10: the reverse); under the
    null each is either kind with probability 1/2, so p = 2·P(Binomial(b01 + b10, 1/2) <= min(b01, b10)),
    capped at 1. Exact rather than the chi-square approximation, which is poor for the few discordant
    questions a small drop leaves. No discordant pair gives 1.
    """
    first, second = _paired(a, b)
    only_first = int(((first > 0) & (second <= 0)).sum())
    only_second = int(((first <= 0) & (second > 0)).sum())
    total = only_first + only_second
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(only_first, only_second) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**total)))
