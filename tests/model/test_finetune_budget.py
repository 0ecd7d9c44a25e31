"""Stage finetune sized for any labeled set: a budget in steps or minutes, early stopping, the epoch cap."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bertflow import training as tr
from bertflow.classification import encode, predict_logits, read_split
from bertflow.io import InputError
from bertflow.model import load_classifier
from bertflow.paths import Paths
from bertflow.tokenization import load_tokenizer
from tasks.cli import run_stage
from tests.conftest import REPO, tiny_profile, write_params
from tests.model.test_finetune_evaluate import learnable_rows, write_tsv

STEPS_PER_EPOCH = 600 // 32  # the learnable set's 600 training rows in batches of the tiny profile's 32
NO_EARLY_STOP = {"finetune.epochs": 20, "finetune.early_stopping_patience": 20}


def learnable_root(tiny_trained, folder, dev_rows, ablation=False):
    """A root holding the learnable set ingested (dev: ``dev_rows``); fine-tuned from the tiny pretrained model."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tsv(folder / "train.tsv", learnable_rows(600))
    write_tsv(folder / "dev.tsv", dev_rows)
    write_tsv(folder / "test.tsv", learnable_rows(50, 700))
    params = tiny_profile()
    params["ingest"]["labeled"] = {split: str(folder / f"{split}.tsv") for split in ("train", "dev", "test")}
    params["finetune"].update(init=str(tiny_trained / "artifacts" / "pretrained"), random_init_ablation=ablation,
                              bf16=False)
    path = write_params(folder, params)
    run_stage("ingest", path, folder / "root")
    return path, folder / "root"


def dev_accuracy(folder, root) -> float:
    """The dev accuracy of the classifier saved in ``folder``, computed afresh."""
    model, tokenizer = load_classifier(folder), load_tokenizer(folder)
    dev = encode(tokenizer, *read_split(Paths(root), "dev"), 64)
    return float((predict_logits(model, dev, tokenizer.pad_token_id, 64).argmax(-1) == np.array(dev.labels)).mean())


# ---------------------------------------------------------------- pure


def test_the_budget_is_whichever_runs_out_first():
    assert tr.Budget(max_steps=10).progress(5, 1e6) == 0.5  # as pretrain has it: steps alone
    assert tr.Budget(minutes=1).progress(10**6, 30) == 0.5  # minutes alone
    assert tr.Budget(max_steps=10, minutes=1).progress(5, 45) == 0.75
    assert tr.Budget(max_steps=10, minutes=1).progress(9, 15) == 0.9
    assert not tr.Budget().spent(10**9, 1e9) and tr.Budget(max_steps=3).spent(3, 0)


# ---------------------------------------------------------------- runs


def test_a_budget_in_steps_ends_training_at_that_step_with_the_schedule_decayed(tiny_trained, tmp_path):
    path, root = learnable_root(tiny_trained, tmp_path, learnable_rows(100, 600))
    run = run_stage("finetune", path, root, {**NO_EARLY_STOP, "finetune.max_steps": 25,
                                             "finetune.eval_every_steps": 10})["pretrained"]
    assert (run["stopped_by"], run["steps"], run["epochs_run"]) == ("budget", 25, round(25 / STEPS_PER_EPOCH, 3))
    # dev every 10 steps, at the epoch's end (18) and where the budget ran out (25)
    assert [row["step"] for row in run["history"]] == [10, STEPS_PER_EPOCH, 20, 25]
    assert [row["epoch"] for row in run["history"]] == [0.556, 1, 1.111, 1.389]
    assert float(run["history"][-1]["lr"]) < 0.1 * 0.001  # laid over the 25 steps, not over 20 epochs
    assert run["best_step"] in [row["step"] for row in run["history"]]


def test_a_budget_in_minutes_ends_training_with_dev_scored_where_it_ran_out(tiny_trained, tmp_path):
    path, root = learnable_root(tiny_trained, tmp_path, learnable_rows(100, 600))
    run = run_stage("finetune", path, root, {**NO_EARLY_STOP, "finetune.budget_minutes": 0.003})["pretrained"]
    assert run["stopped_by"] == "budget" and run["steps"] < 20 * STEPS_PER_EPOCH
    assert run["history"][-1]["step"] == run["steps"] and run["seconds"] >= 0.18


def test_early_stopping_ends_each_run_and_restores_its_best_evaluation(tiny_trained, tmp_path):
    # dev labels the opposite of train's: learning train makes dev worse, not learning leaves it flat
    inverted = [(text, 1 - label) for text, label in learnable_rows(100, 600)]
    path, root = learnable_root(tiny_trained, tmp_path, inverted, ablation=True)
    figures = run_stage("finetune", path, root, {"finetune.epochs": 12, "finetune.learning_rate": 0.01,
                                                 "finetune.early_stopping_patience": 2})
    artifacts = root / "artifacts"
    saved = {"pretrained": artifacts / "classifier", "random_init": artifacts / "ablation" / "random_init"}
    for name, folder in saved.items():  # the ablation stops by its own dev curve
        run = figures[name]
        curve = [row["dev_accuracy"] for row in run["history"]]
        best = curve.index(max(curve))
        assert run["stopped_by"] == "early_stopping" and len(curve) == best + 1 + 2, (name, curve)
        assert (run["best_epoch"], run["best_step"]) == (best + 1, (best + 1) * STEPS_PER_EPOCH), name
        # the run's last checkpoint holds the final weights and the best ones: the saved model is the best
        last = tr.CheckpointStore.load(sorted((artifacts / "finetune_checkpoints" / name).glob("step-*"))[-1])
        weights = load_file(folder / "model.safetensors")
        assert all(torch.equal(weights[key], last["best"][key]) for key in weights), name
        assert not all(torch.equal(weights[key], last["model"][key]) for key in weights), name
        assert dev_accuracy(folder, root) == run["best_dev_accuracy"] == curve[best], name


def test_the_epoch_cap_ends_a_run_without_a_budget(tiny_trained):
    figures = json.loads((tiny_trained / "reports" / "finetune.json").read_text())  # params.tiny.yaml: epochs 2
    for name in ("pretrained", "random_init"):
        run = figures[name]
        assert (run["stopped_by"], run["epochs_run"]) == ("max_epochs", 2), name
        assert [row["epoch"] for row in run["history"]] == [1, 2] and run["steps"] == run["history"][-1]["step"]


def test_a_training_set_smaller_than_one_batch_is_refused(tiny_trained, tmp_path):
    import shutil

    shutil.copytree(tiny_trained / "data", tmp_path / "data")
    shutil.copytree(tiny_trained / "artifacts" / "pretrained", tmp_path / "artifacts" / "pretrained")
    with pytest.raises(InputError, match=r"train.parquet: \d+ rows, fewer than finetune.batch_size=100000"):
        run_stage("finetune", REPO / "params.tiny.yaml", tmp_path, {"finetune.batch_size": 100000,
                                                                     "finetune.random_init_ablation": False})
