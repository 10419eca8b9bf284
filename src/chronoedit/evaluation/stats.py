"""Small statistics for evaluation: means, stratified bootstrap intervals and the exact sign test (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean(values: Sequence[float]) -> float | None:
    """The mean, None for no values."""
    return float(sum(values) / len(values)) if len(values) else None


def mean_of_means(groups: Sequence[Sequence[float]]) -> float | None:
    """The mean of the groups' means (groups without values left out)."""
    means = [m for group in groups if (m := mean(group)) is not None]
    return mean(means)


def bootstrap_ci(groups: Sequence[Sequence[float]], statistic: Callable[[list[np.ndarray]], float],
                 samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float] | None:  # fmt: skip
    """The percentile interval of ``statistic`` over bootstrap resamples drawn within each group (stratified: each
    group keeps its size); None without values. Seeded, so a run's intervals are reproducible."""
    arrays = [np.asarray(group, dtype=np.float64) for group in groups if len(group)]
    if not arrays or samples < 1:
        return None
    rng = np.random.default_rng(seed)
    draws = np.empty(samples)
    for index in range(samples):
        draws[index] = statistic([array[rng.integers(0, len(array), len(array))] for array in arrays])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def pooled_mean(arrays: list[np.ndarray]) -> float:
    """The mean of all values of all groups (the micro average)."""
    return float(np.concatenate(arrays).mean())


def macro_mean(arrays: list[np.ndarray]) -> float:
    """The mean of the groups' means (the macro average)."""
    return float(np.mean([array.mean() for array in arrays]))


def sign_test(differences: Sequence[float]) -> tuple[int, int, int, float]:
    """(wins, losses, ties, two-sided exact p) of the sign test on paired differences; ties are dropped."""
    wins = sum(1 for d in differences if d > 0)
    losses = sum(1 for d in differences if d < 0)
    ties = len(differences) - wins - losses
    n = wins + losses
    if n == 0:
        return wins, losses, ties, 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return wins, losses, ties, min(1.0, 2 * tail)
