"""The model card's and the run report's account of fine-tuning: what ended the run and where the kept weights
are from, in the words of reports/finetune.json (stopped_by, best_step), not the epoch cap alone."""

from __future__ import annotations

import pytest

from bertflow.cards import finetune_text, model_card
from bertflow.params import load_params
from bertflow.paths import Paths
from tasks.report import finetuning_section
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
