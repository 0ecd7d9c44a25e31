"""The Kneser-Ney bigram baseline against probabilities and a perplexity worked out by hand."""

import math

import pytest

from tasks.lm_baselines import END, START, KneserNeyBigram, bigrams, context_distribution

# Three sentences over pieces 0, 1, 2; with boundaries: S 0 1 E, S 0 2 E, S 1 2 E.
# Bigram counts: (S,0) 2, (0,1) 1, (1,E) 1, (0,2) 1, (2,E) 2, (S,1) 1, (1,2) 1: 7 distinct pairs.
# N1+(v •): S 2, 0 2, 1 2, 2 1.  N1+(• w): 0 1, 1 2, 2 2, E 2 (4 words seen after something).
# With d = 1/2 and |V| = 4 (three pieces and E):
#   P_cont(w) = max(N1+(• w) − 1/2, 0) / 7 + (1/2 · 4 / 7) / 4  →  0: 1/7, 1: 2/7, 2: 2/7, E: 2/7
CORPUS = [[0, 1], [0, 2], [1, 2]]


@pytest.fixture
def model():
    return KneserNeyBigram(CORPUS, vocab_size=3, discount=0.5)


def test_boundaries():
    assert bigrams([7, 8]) == [(START, 7), (7, 8), (8, END)]


def test_probabilities_by_hand(model):
    assert [model.continuation(w) for w in (0, 1, 2, END)] == pytest.approx([1 / 7, 2 / 7, 2 / 7, 2 / 7])
    # P(1 | 0) = (1 − 1/2) / 2 + 1/2 · 2/2 · 2/7
    assert model.probability(1, 0) == pytest.approx(1 / 4 + 1 / 7)
    # P(0 | S) = (2 − 1/2) / 3 + 1/2 · 2/3 · 1/7
    assert model.probability(0, START) == pytest.approx(1 / 2 + 1 / 21)
    # an unseen pair keeps the back-off mass: P(0 | 2) = 1/2 · 1/2 · 1/7
    assert model.probability(0, 2) == pytest.approx(1 / 28)
    # an unseen context is the continuation distribution
    assert model.probability(1, 99) == pytest.approx(2 / 7)


def test_every_distribution_sums_to_one(model):
    for previous in (START, 0, 1, 2, 99):
        assert sum(context_distribution(model, previous, 3).values()) == pytest.approx(1.0)


def test_perplexity_by_hand(model):
    # S 0 1 E: P(0|S) = 23/42, P(1|0) = 11/28, P(E|1) = 1/4 + 1/2 · 2/2 · 2/7 = 11/28
    expected = (23 / 42 * 11 / 28 * 11 / 28) ** (-1 / 3)
    assert model.perplexity([[0, 1]]) == pytest.approx(expected)
    total, count = model.log_likelihood([[0, 1], [2]])
    assert count == 5 and total == pytest.approx(math.log(23 / 42 * 11 / 28 * 11 / 28) + math.log(
        model.probability(2, START) * model.probability(END, 2)))


def test_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="no training sequences"):
        KneserNeyBigram([], vocab_size=3)
    with pytest.raises(ValueError, match="discount"):
        KneserNeyBigram(CORPUS, vocab_size=3, discount=1.0)
    with pytest.raises(ValueError, match="no sequences to score"):
        KneserNeyBigram(CORPUS, vocab_size=3).perplexity([])


def test_lstm_language_model_learns_and_scores_like_its_loss():
    import torch

    from tasks.lm_baselines import lstm_batch, lstm_loss, lstm_model, lstm_perplexity, train_lstm

    inputs, targets = lstm_batch([[4, 5], [6]], vocab_size=8)
    assert inputs.tolist() == [[8, 4, 5], [8, 6, 0]] and targets.tolist() == [[4, 5, 8], [6, 8, -100]]
    corpus = [[1, 2, 3, 4], [1, 2, 3], [5, 6, 7, 4], [5, 6, 7]] * 8  # the next piece is predictable
    model = lstm_model(vocab_size=8, embedding=16, hidden=32, seed=0)
    before = lstm_perplexity(model, corpus, 8)
    losses = train_lstm(model, corpus, 8, steps=150, batch_size=8, learning_rate=1e-2)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 2
    after = lstm_perplexity(model, corpus, 8)
    assert after < before / 2 and after < 3.0
    with torch.no_grad():  # perplexity is exp of the mean loss per predicted symbol
        assert math.log(after) == pytest.approx(float(lstm_loss(model, corpus, 8)), rel=1e-5)
