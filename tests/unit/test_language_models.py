"""The Kneser-Ney bigram baseline against probabilities and a perplexity worked out by hand."""

import math

import pytest

from bertflow.language_models import END, START, KneserNeyBigram, bigrams, context_distribution

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

    from bertflow.language_models import lstm_batch, lstm_loss, lstm_model, lstm_perplexity, train_lstm

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


def test_ney_discount_and_unigram_floor_by_hand():
    from bertflow.language_models import ney_discount, unigram_perplexity

    # CORPUS's bigram counts: five seen once, two seen twice → d = 5 / (5 + 2·2) = 5/9.
    assert ney_discount(KneserNeyBigram(CORPUS, vocab_size=3).pair_counts) == pytest.approx(5 / 9)
    assert KneserNeyBigram(CORPUS, vocab_size=3, discount=None).discount == pytest.approx(5 / 9)
    # Unigram counts with E: 0 2, 1 2, 2 2, E 3 (9 in all); add-one over 4 classes: P(0) = 3/13, P(E) = 4/13.
    assert unigram_perplexity(CORPUS, [[0]], vocab_size=3) == pytest.approx(13 / math.sqrt(12))


def test_lstm_output_is_a_distribution_in_id_order():
    import torch

    from bertflow.language_models import frequency_rank, lstm_model, usable_cutoffs

    rank = frequency_rank([[3, 3, 3, 1], [3, 1, 2]], vocab_size=5)  # classes 0..4 pieces, 5 the end symbol
    assert rank[3] == 0 and rank[1] == 1 and rank[5] == 2 and rank[2] == 3  # 3 ×4, 1 ×2, E ×2, 2 ×1
    assert sorted(rank.tolist()) == list(range(6))
    assert usable_cutoffs([2000, 8000], classes=16385) == [2000, 8000]
    assert usable_cutoffs([2000, 8000], classes=100) == [25]
    model = lstm_model(vocab_size=5, embedding=8, hidden=8, seed=0, class_rank=rank, cutoffs=[3])
    with torch.no_grad():
        distribution = model.next_distribution(torch.tensor([[5, 3, 1]]))[0]
        assert float(distribution.sum()) == pytest.approx(1.0, abs=1e-5)
        # The log-probability of a target is the one its id has in that distribution (rank mapping undone).
        scored = model.target_log_probs(torch.tensor([[5, 3, 1]]), torch.tensor([[3, 1, 2]]))[2]
        assert float(scored.exp()) == pytest.approx(float(distribution[2]), rel=1e-5)


def test_lstm_training_stops_at_its_time_budget():
    from bertflow.language_models import lstm_model, train_lstm

    model = lstm_model(vocab_size=8, embedding=8, hidden=8, seed=0)
    losses = train_lstm(model, [[1, 2, 3]] * 4, 8, batch_size=2, budget_seconds=0.5)
    assert 1 <= len(losses) < 100_000
    with pytest.raises(ValueError, match="steps or budget_seconds"):
        train_lstm(model, [[1, 2]], 8)


def test_boundary_pairs_are_every_sentences_bigrams_in_order():
    from bertflow.language_models import boundary_pairs

    sentences = [[0, 1], [], [2], [1, 1, 0]]
    previous, following = boundary_pairs(sentences)
    assert list(zip(previous.tolist(), following.tolist(), strict=True)) == [
        pair for sentence in sentences for pair in bigrams(sentence)]
