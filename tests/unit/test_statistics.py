"""Honest comparisons: McNemar's exact test and the bootstrap interval, on known answers and a reference."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from bertflow.cards import comparison_lines
from bertflow.io import InputError
from bertflow.statistics import NEITHER, accuracy_interval, mcnemar, mcnemar_p, paired_runs, sign_flip_p


def paired(b, c, both=0, neither=0):
    """Per-row correctness of a classifier and a baseline with b, c discordant rows."""
    ours = [True] * b + [False] * c + [True] * both + [False] * neither
    theirs = [False] * b + [True] * c + [True] * both + [False] * neither
    return np.array(ours), np.array(theirs)


def test_mcnemar_known_answers():
    assert mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)  # 2 · (C(12,0) + C(12,1) + C(12,2)) / 2^12
    assert mcnemar_p(2, 10) == mcnemar_p(10, 2)
    assert mcnemar_p(7, 7) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 2 · P(X = 0), X ~ Bin(5, 1/2)
    result = mcnemar(*paired(10, 2, both=700, neither=160))
    assert result == {"b": 10, "c": 2, "p_value": 0.03857, "better": "classifier"}
    assert mcnemar(*paired(2, 10))["better"] == "baseline"
    assert mcnemar(*paired(6, 2))["better"] == NEITHER  # p = 0.289
    assert mcnemar(*paired(0, 0, both=5)) == {"b": 0, "c": 0, "p_value": 1.0, "better": NEITHER}


@pytest.mark.parametrize(("b", "c"), [(0, 1), (3, 9), (40, 60), (120, 80), (400, 310)])
def test_mcnemar_agrees_with_scipys_exact_binomial_test(b, c):
    assert mcnemar_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_refuses_rows_that_do_not_pair():
    with pytest.raises(InputError, match="baseline: 3 right/wrong flags for the classifier's 4 test rows"):
        mcnemar(np.ones(4, bool), np.ones(3, bool))
    with pytest.raises(InputError, match="baseline: right/wrong flags must be booleans or 0/1"):
        mcnemar(np.ones(3, bool), np.array([0, 1, 2]))
    with pytest.raises(InputError, match="classifier: expected one right/wrong flag per test row"):
        mcnemar(np.array([], bool), np.array([], bool))


def test_bootstrap_interval_holds_the_accuracy_and_is_deterministic():
    correct = np.random.default_rng(1).random(872) < 0.8
    accuracy = correct.mean()
    interval = accuracy_interval(correct, resamples=10_000, seed=0)
    assert interval["lower"] < accuracy < interval["upper"]
    assert (interval["level"], interval["resamples"], interval["seed"]) == (0.95, 10_000, 0)
    assert accuracy_interval(correct, resamples=10_000, seed=0) == interval
    assert accuracy_interval(correct.astype(int), resamples=10_000, seed=0) == interval
    assert accuracy_interval(correct, resamples=10_000, seed=1) != interval
    # the normal approximation: ±1.96 · sqrt(p(1-p)/n), about ±2.7 points here
    half = 1.96 * math.sqrt(accuracy * (1 - accuracy) / correct.size)
    assert (interval["upper"] - interval["lower"]) / 2 == pytest.approx(half, rel=0.1)
    assert interval["lower"] == pytest.approx(accuracy - half, abs=0.005)


def test_bootstrap_interval_narrows_with_more_rows():
    rng = np.random.default_rng(2)
    widths = []
    for rows in (100, 872, 8000):
        interval = accuracy_interval(rng.random(rows) < 0.8, resamples=2000, seed=0)
        widths.append(interval["upper"] - interval["lower"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(math.sqrt(8000 / 100), rel=0.2)  # width ∝ 1/sqrt(n)


def test_bootstrap_refuses_bad_input():
    with pytest.raises(InputError, match="resamples must be at least 1, got 0"):
        accuracy_interval(np.ones(5, bool), resamples=0)
    with pytest.raises(InputError, match="level must be between 0 and 1, got 95"):
        accuracy_interval(np.ones(5, bool), level=95)
    with pytest.raises(InputError, match="accuracy_interval: expected one right/wrong flag per test row"):
        accuracy_interval(np.ones((2, 3), bool))


def test_the_card_reads_the_comparisons_at_a_glance():
    evaluation = {"test_rows": 872, "test": {"accuracy": 0.80161, "accuracy_interval": {
        "lower": 0.77523, "upper": 0.82798, "level": 0.95, "resamples": 10_000, "seed": 0}},
        "baselines": {"tfidf_logreg": {"accuracy": 0.825, "mcnemar": {"b": 30, "c": 50, "p_value": 0.03284,
                                                                      "better": "baseline"}},
                      "majority": {"accuracy": 0.50917, "mcnemar": {"b": 300, "c": 45, "p_value": 1e-45,
                                                                    "better": "classifier"}},
                      "random_init": {"accuracy": 0.79, "mcnemar": {"b": 20, "c": 18, "p_value": 0.8714,
                                                                    "better": NEITHER}}}}
    lines = comparison_lines(evaluation)
    assert lines[0] == ("Test accuracy 80.2 % [77.5, 82.8]: 95 % percentile bootstrap interval, "
                        "10,000 resamples of the 872 test rows.")
    assert ("- classifier 80.2 % [77.5, 82.8] vs TF-IDF + logistic regression 82.5 %: McNemar p = 0.033 "
            "(b = 30, c = 50), TF-IDF + logistic regression better.") in lines
    assert any(line.endswith("McNemar p = 1e-45 (b = 300, c = 45), classifier better.") for line in lines)
    assert any(line.endswith("(b = 20, c = 18), no difference at 5 %.") for line in lines)
    assert comparison_lines({"test": {"accuracy": 0.8}, "baselines": {"majority": {"accuracy": 0.5}}}) == []


# ---------------------------------------------------------------- several seeds: the paired sign-flip test


def test_sign_flip_known_answers():
    # magnitudes 2 (once) and 1 (three times): 16 sign assignments, 8 of them with |sum| >= |2+1+1-1| = 3
    assert sign_flip_p(np.array([2, 1, 1, -1, 0])) == 0.5
    assert sign_flip_p(np.array([3, 3])) == 0.5  # ±3 ±3: |sum| = 6 in 2 of 4
    assert sign_flip_p(np.array([0, 0])) == 1.0 and sign_flip_p(np.array([1, -1])) == 1.0
    assert sign_flip_p(np.array([1] * 20)) == pytest.approx(2 / 2**20)  # every row one way: only all-plus/minus


@pytest.mark.parametrize(("b", "c"), [(10, 2), (3, 9), (40, 60), (400, 310)])
def test_one_seed_is_mcnemars_exact_test(b, c):
    ours, theirs = paired(b, c, both=300, neither=100)
    result = paired_runs(ours, theirs, resamples=200)
    assert result["p_value"] == mcnemar(ours, theirs)["p_value"]
    assert result["better"] == mcnemar(ours, theirs)["better"]
    assert result["gain"] == pytest.approx((b - c) / ours.size, abs=1e-5)


def test_sign_flip_agrees_with_brute_force_enumeration():
    import itertools

    d = np.array([3, -1, 2, 2, -3, 1, 0, 2])
    observed = abs(d.sum())
    flips = [abs(sum(s * abs(x) for s, x in zip(signs, d, strict=True)))
             for signs in itertools.product((1, -1), repeat=d.size)]
    assert sign_flip_p(d) == pytest.approx(sum(f >= observed for f in flips) / len(flips))


def test_several_seeds_pool_their_rows_and_a_deterministic_side_is_repeated():
    rng = np.random.default_rng(1)
    ours = rng.random((3, 872)) < 0.84  # three seeds of a classifier near 84 %
    theirs = rng.random((3, 872)) < 0.80
    result = paired_runs(ours, theirs, resamples=2000, seed=5)
    assert result["runs"] == 3
    assert result["gain"] == pytest.approx(ours.mean() - theirs.mean(), abs=1e-5)
    assert result["gain_interval"]["lower"] < result["gain"] < result["gain_interval"]["upper"]
    assert result == paired_runs(ours, theirs, resamples=2000, seed=5)  # deterministic under its seed
    assert result["p_value"] < 0.05 and result["better"] == "classifier"
    tfidf = rng.random(872) < 0.825
    against_one = paired_runs(ours, tfidf, resamples=200)
    assert against_one == paired_runs(ours, np.stack([tfidf] * 3), resamples=200)
    with pytest.raises(InputError, match="2 seeds × 872 rows for the classifier's 3 × 872"):
        paired_runs(ours, theirs[:2])
