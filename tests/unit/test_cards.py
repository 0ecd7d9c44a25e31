"""The model card's and the run report's account of fine-tuning: what ended the run and where the kept weights
are from, in the words of reports/finetune.json (stopped_by, best_step), not the epoch cap alone."""

from __future__ import annotations

import pytest

from bertflow.cards import finetune_text, model_card, pretraining_verdict
from bertflow.params import load_params
from bertflow.paths import Paths
from tasks.report import finetuning_section, summary_section
from tests.conftest import REPO

RUN = {"stopped_by": "early_stopping", "best_epoch": 2, "best_step": 3000, "best_dev_accuracy": 0.912,
       "epochs_run": 4, "steps": 7000, "seconds": 1500.0}


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml").model_dump(mode="json")


def test_the_card_says_what_ended_fine_tuning_and_the_limits(params):
    params["finetune"].update(budget_minutes=30, max_steps=None, epochs=20)
    card = model_card("m", "3", params, {"finetune": {"pretrained": RUN}}, {}, "champion", "no champion yet")
    line = next(line for line in card.splitlines() if line.startswith("- Fine-tuning:"))
    assert "7000 steps in 4 epochs, ended by early stopping" in line
    assert "best dev evaluation (step 3000, epoch 2: dev accuracy 0.912)" in line
    assert "30 min budget, 20-epoch cap" in line


@pytest.mark.parametrize("stopped_by, budget, words", [
    ("budget", {"max_steps": 500, "budget_minutes": None}, ["ended by the budget ran out", "500 steps budget"]),
    ("max_epochs", {"max_steps": None, "budget_minutes": None}, ["ended by the epoch cap", "no budget"]),
])
def test_each_ending_and_budget_kind_is_worded(params, stopped_by, budget, words):
    params["finetune"].update(budget)
    text = finetune_text({**RUN, "stopped_by": stopped_by}, params["finetune"])
    assert all(word in text for word in words), text


def test_a_run_that_did_not_fine_tune_is_said_so(params):
    assert finetune_text({}, params["finetune"]).startswith("not run (")


def test_the_report_table_has_the_ending_and_the_best_step(tmp_path):
    html = finetuning_section({"finetune": {"pretrained": RUN, "random_init": {**RUN, "stopped_by": "budget"}}},
                              Paths(tmp_path))
    for cell in ("ended by", "best step", "early stopping", "the budget ran out", "3,000", "7,000"):
        assert cell in html, cell


GAIN = {"gain": -0.0046, "classifier_accuracy": 0.8012, "other_accuracy": 0.8058, "p_value": 0.61,
        "better": "neither at 5 %", "classifier_accuracy_by_seed": [0.80, 0.81, 0.7936],
        "gain_interval": {"lower": -0.021, "upper": 0.012, "level": 0.95},
        "tfidf_logreg": {"gain": -0.0233, "other_accuracy": 0.8245, "p_value": 0.004}}


@pytest.mark.parametrize(("better", "opening"), [("classifier", "Pretraining paid"),
                                                 ("baseline", "Pretraining cost accuracy"),
                                                 ("neither at 5 %", "Pretraining did not pay measurably")])
def test_the_first_card_and_the_model_card_say_whether_pretraining_paid(params, better, opening):
    evaluation = {"test": {"accuracy": 0.8}, "pretraining_gain": {**GAIN, "better": better}}
    sentence = pretraining_verdict(evaluation)
    assert sentence == (f"{opening}: -0.5 points over the same fine-tuning from random weights (80.1 % vs 80.6 %, "
                        "95 % interval [-2.1, +1.2], exact paired p = 0.61, 3 seeds); against TF-IDF + logistic "
                        "regression (82.5 %) -2.3 points, p = 0.004.")
    assert sentence in summary_section({"evaluate": evaluation}).replace("&#x27;", "'")
    card = model_card("m", "1", params, {"evaluate": {**evaluation, "test": {
        "accuracy": 0.8, "accuracy_interval": {"lower": 0.77, "upper": 0.83, "level": 0.95, "resamples": 100}}}},
        {}, "champion", "no champion yet")
    assert sentence in card and "post-LayerNorm BERT L4/H256/A4" in card
    assert pretraining_verdict({"test": {"accuracy": 0.8}}) is None  # no ablation, no claim
