"""Pure pieces of the pretraining objectives: ROC-AUC's known answers, ELECTRA's corruption and sampling, single
segments without next-sentence prediction, and which held-out figures each objective reports."""

import random

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from bertflow.electra import corrupt, noise_generator, sample
from bertflow.metrics import roc_auc
from bertflow.pairs import PairSpec, create_segments_from_document
from bertflow.pretraining import Objective, _heldout_figures


def test_roc_auc_known_answers():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # scikit-learn's documented example
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5  # ties count half
    assert roc_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == 0.875  # one tied pair of four: 3.5 / 4
    assert roc_auc([0.1, 0.2], [1, 1]) is None  # one class only


def test_roc_auc_agrees_with_scikit_learn_on_ties():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 7, 2000).astype(float), rng.integers(0, 2, 2000)
    assert roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


def test_corrupt_puts_samples_at_masked_positions_and_a_correct_sample_counts_as_original():
    masked = torch.tensor([[2, 4, 11, 4, 3]])  # [CLS] [MASK] w [MASK] [SEP]; originals 10 and 12
    selected = torch.tensor([[False, True, False, True, False]])
    corrupted, replaced = corrupt(masked, selected, torch.tensor([10, 12]), torch.tensor([10, 99]))
    assert corrupted.tolist() == [[2, 10, 11, 99, 3]]
    assert replaced.tolist() == [[False, False, False, True, False]]


def test_samples_follow_the_softmax_and_repeat_with_the_seed():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).expand(20000, 4)
    draws = sample(logits, noise_generator("42/7/0/0", torch.device("cpu")))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.015)
    assert torch.equal(draws, sample(logits, noise_generator("42/7/0/0", torch.device("cpu"))))
    assert not torch.equal(draws, sample(logits, noise_generator("42/8/0/0", torch.device("cpu"))))


def test_single_segments_pack_whole_sentences_up_to_the_length():
    spec = PairSpec(cls_id=2, sep_id=3, max_seq_length=8, short_seq_prob=0.0)  # 6 word pieces per instance
    document = [[10, 11], [12, 13, 14], [15, 16], [20, 21, 22, 23, 24, 25, 26, 27]]
    instances = create_segments_from_document(document, spec, random.Random(0))
    assert [i.input_ids for i in instances] == [[2, 10, 11, 12, 13, 14, 3], [2, 15, 16, 3],
                                                [2, 20, 21, 22, 23, 24, 25, 3], [2, 26, 27, 3]]
    assert all(set(i.token_type_ids) == {0} and len(i.token_type_ids) == len(i.input_ids) for i in instances)
    assert not any(i.is_random_next for i in instances)


def test_each_objective_reports_only_the_figures_it_has():
    sums = {"mlm_loss": 20.0, "mlm_correct": 3, "mlm_count": 10, "nsp_correct": 4, "rtd_loss": 5.0,
            "rtd_correct": 18, "rtd_count": 20}
    assert set(_heldout_figures(sums, 8, Objective("mlm_nsp"), [], [])) == {"mlm_loss", "mlm_accuracy",
                                                                           "nsp_accuracy", "instances"}
    assert set(_heldout_figures(sums, 8, Objective("mlm"), [], [])) == {"mlm_loss", "mlm_accuracy", "instances"}
    scores, labels = [np.array([0.1, 0.9, 0.3])], [np.array([False, True, False])]
    electra = _heldout_figures(sums, 8, Objective("electra"), scores, labels)
    assert "nsp_accuracy" not in electra
    assert (electra["rtd_accuracy"], electra["rtd_auc"], electra["rtd_loss"]) == (0.9, 1.0, 0.25)


def test_shorten_keeps_each_segments_beginning_and_moves_the_masks():
    from bertflow.pretraining import shorten

    pair = [2, 10, 11, 12, 13, 3, 20, 21, 22, 3]  # [CLS] a1..a4 [SEP] b1..b3 [SEP]
    segments = [0] * 6 + [1] * 4
    assert shorten(pair, segments, [2, 4, 7, 8], [111, 113, 121, 122], 7) == (
        [2, 10, 11, 3, 20, 21, 3], [0, 0, 0, 0, 1, 1, 1], [2, 5], [111, 121])
    assert shorten(pair, segments, [2], [111], 10) == (pair, segments, [2], [111])  # short enough: unchanged
    long_a = [2, *range(10, 20), 3, 20, 3]  # A of 10, B of 1: B keeps its piece, A gives way
    assert shorten(long_a, [0] * 12 + [1] * 2, [], [], 8)[0] == [2, 10, 11, 12, 13, 3, 20, 3]
    single = [2, 10, 11, 12, 13, 14, 3]
    assert shorten(single, [0] * 7, [1, 5], [110, 114], 5) == ([2, 10, 11, 12, 3], [0] * 5, [1], [110])
