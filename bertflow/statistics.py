"""Honest comparisons on one test set: a bootstrap interval for accuracy and McNemar's exact paired test.

Pure numpy and integer arithmetic; reads and writes nothing (the ``evaluate`` stage feeds it per-item
correctness, one boolean per test row, the classifier's and each baseline's on the same rows).

On n rows an accuracy p has a standard error of sqrt(p(1-p)/n), about 1.3 points at p = 0.8 and
n = 872, so two models a point apart are not told apart by their accuracies alone. The percentile
bootstrap resamples the rows with replacement and takes the middle ``level`` of the resampled
accuracies. McNemar's test looks only at the rows where the two models disagree: b rows the
classifier gets right and the baseline wrong, c the reverse; with no difference between them each such
row is a fair coin, so the exact two-sided p is min(1, 2 · P(X <= min(b, c))) with X ~ Bin(b + c, 1/2).

    >>> mcnemar(np.array([1] * 10 + [0] * 2, bool), np.array([0] * 10 + [1] * 2, bool))["p_value"]
    0.03857
"""

from __future__ import annotations

import math

import numpy as np

from bertflow.io import InputError

ALPHA = 0.05  # the level "better" is judged at
NEITHER = "neither at 5 %"
CHUNK = 1000  # resamples drawn at once: 1000 × 872 row indices is 7 MB


def correctness(values, name: str) -> np.ndarray:
    """One boolean per test row (True: right); anything else is refused, naming ``name``."""
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise InputError(f"{name}: expected one right/wrong flag per test row, got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise InputError(f"{name}: right/wrong flags must be booleans or 0/1, got values like {array[:3].tolist()}")
    return array.astype(bool)


def accuracy_interval(correct, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the accuracy of ``correct``: the same input and seed, the same interval."""
    correct = correctness(correct, "accuracy_interval")
    if resamples < 1:
        raise InputError(f"bootstrap resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise InputError(f"interval level must be between 0 and 1, got {level}")
    accuracies = resampled_accuracies(correct, resamples, np.random.default_rng(seed))
    lower, upper = np.quantile(accuracies, [(1 - level) / 2, (1 + level) / 2])
    return {"lower": round(float(lower), 5), "upper": round(float(upper), 5), "level": level,
            "resamples": resamples, "seed": seed}


def resampled_accuracies(correct: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The accuracy of each of ``resamples`` resamples of the rows (with replacement), in chunks."""
    accuracies = []
    for start in range(0, resamples, CHUNK):
        rows = rng.integers(0, correct.size, size=(min(CHUNK, resamples - start), correct.size))
        accuracies.append(correct[rows].mean(axis=1))
    return np.concatenate(accuracies)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p: min(1, 2 · P(X <= min(b, c))), X ~ Bin(b + c, 1/2); 1 when b + c == 0."""
    if b < 0 or c < 0:
        raise InputError(f"discordant counts must not be negative, got b={b}, c={c}")
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # integer division of exact counts: no float underflow for large n


def mcnemar(classifier_correct, baseline_correct) -> dict:
    """McNemar's exact test of the classifier against a baseline on the same rows, and which one is better."""
    ours, theirs = correctness(classifier_correct, "classifier"), correctness(baseline_correct, "baseline")
    if ours.size != theirs.size:
        raise InputError(f"baseline: {theirs.size} right/wrong flags for the classifier's {ours.size} test rows; "
                         "both must be scored on the same rows")
    b, c = int(np.sum(ours & ~theirs)), int(np.sum(~ours & theirs))
    p = mcnemar_p(b, c)
    return {"b": b, "c": c, "p_value": float(f"{p:.4g}"), "better": better(b, c, p)}


def better(b: int, c: int, p: float) -> str:
    if p >= ALPHA:
        return NEITHER
    return "classifier" if b > c else "baseline"
