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

Over several fine-tuning seeds (the pretrained classifier and its random-init ablation, each fine-tuned
with seeds s, s+1, ...), each test row i gets d_i = (times the classifier got it right) − (times the
other side did), an integer in [−N, N]. With no difference between the two sides, which side a row's
outcomes belong to is a coin flip, so the exact paired sign-flip test compares |Σ d_i| with the
distribution of |Σ ±|d_i||, worked out exactly by convolving one binomial per magnitude. With one seed
it is McNemar's exact test; the gain's interval resamples the test rows, as the accuracy's does.
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
    accuracies = resampled_means(correct, resamples, np.random.default_rng(seed))
    lower, upper = np.quantile(accuracies, [(1 - level) / 2, (1 + level) / 2])
    return {"lower": round(float(lower), 5), "upper": round(float(upper), 5), "level": level,
            "resamples": resamples, "seed": seed}


def resampled_means(correct: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of each of ``resamples`` resamples of the rows (with replacement), in chunks: the accuracy of
    right/wrong flags, the gain of per-row differences."""
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


def correctness_runs(values, name: str) -> np.ndarray:
    """One row of right/wrong flags per fine-tuning seed (a single run is one row), as booleans."""
    array = np.asarray(values)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise InputError(f"{name}: expected one right/wrong flag per test row for each seed, got shape {array.shape}")
    return np.stack([correctness(row, name) for row in array])


def sign_flip_p(differences) -> float:
    """Exact two-sided p of the paired sign-flip test: P(|Σ ε_i |d_i|| >= |Σ d_i|), ε_i = ±1 fair coins.

    ``differences`` are integers (per row: seeds the classifier was right minus seeds the other side was).
    Rows with the same magnitude m contribute m · (2X − k), X ~ Bin(k, 1/2); the convolution of those
    is exact in integers, so even tiny p-values do not underflow.
    """
    d = np.asarray(differences)
    if d.ndim != 1 or not np.issubdtype(d.dtype, np.integer):
        raise InputError(f"sign-flip test: expected integer differences per row, got {d.dtype} of shape {d.shape}")
    observed = abs(int(d.sum()))
    magnitudes, counts = np.unique(np.abs(d[d != 0]), return_counts=True)
    ways = {0: 1}  # sum of the flipped differences -> number of sign assignments giving it
    for magnitude, count in zip(magnitudes.tolist(), counts.tolist(), strict=True):
        step = {magnitude * (2 * x - count): math.comb(count, x) for x in range(count + 1)}
        ways = convolve(ways, step)
    total = 2 ** int(counts.sum())
    extreme = sum(n for value, n in ways.items() if abs(value) >= observed)
    return min(1.0, extreme / total)


def convolve(left: dict[int, int], right: dict[int, int]) -> dict[int, int]:
    """The distribution of a sum of two independent integer variables, as counts of ways."""
    out: dict[int, int] = {}
    for a, m in left.items():
        for b, n in right.items():
            out[a + b] = out.get(a + b, 0) + m * n
    return out


def paired_runs(classifier_correct, other_correct, resamples: int = 10_000, seed: int = 0,
                level: float = 0.95) -> dict:
    """The classifier against another side over the same seeds (or against one deterministic run, such as
    TF-IDF, repeated): mean accuracies, the gain with its bootstrap interval, and the exact sign-flip test."""
    ours, theirs = correctness_runs(classifier_correct, "classifier"), correctness_runs(other_correct, "other side")
    if theirs.shape[0] == 1:
        theirs = np.repeat(theirs, ours.shape[0], axis=0)
    if ours.shape != theirs.shape:
        raise InputError(f"other side: {theirs.shape[0]} seeds × {theirs.shape[1]} rows for the classifier's "
                         f"{ours.shape[0]} × {ours.shape[1]}; both must be scored on the same rows and seeds")
    differences = ours.sum(axis=0).astype(np.int64) - theirs.sum(axis=0).astype(np.int64)
    p = sign_flip_p(differences)
    gain = differences / ours.shape[0]  # per row: the classifier's accuracy minus the other's, over seeds
    resampled = resampled_means(gain, resamples, np.random.default_rng(seed))
    lower, upper = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    wins, losses, total = int((differences > 0).sum()), int((differences < 0).sum()), int(differences.sum())
    return {"runs": int(ours.shape[0]), "classifier_accuracy": round(float(ours.mean()), 5),
            "other_accuracy": round(float(theirs.mean()), 5), "gain": round(float(gain.mean()), 5),
            "gain_interval": {"lower": round(float(lower), 5), "upper": round(float(upper), 5), "level": level,
                              "resamples": resamples, "seed": seed},
            "rows_better": wins, "rows_worse": losses, "p_value": float(f"{p:.4g}"),
            "better": better(max(total, 0), max(-total, 0), p)}
