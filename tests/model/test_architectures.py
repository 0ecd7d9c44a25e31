"""Pre-LayerNorm BERT (``pretrain.architecture: megatron_bert``) through the whole chain: pretraining lowers its
losses and a killed run resumes to the same weights; finetune, evaluate, attention, optimize (int8, ONNX within
its tolerance, student, pruned), register, and a consumer process without bertflow; a checkpoint of the other
family is refused naming both."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from safetensors.torch import load_file

from bertflow.io import InputError
from tasks.cli import run_stage
from tests.conftest import REPO, copy_outputs, kill_stage_after_first_checkpoint

TINY = REPO / "params.tiny.yaml"
PRE_LN = {"pretrain.architecture": "megatron_bert", "pretrain.max_steps": 30, "pretrain.eval_every": 10,
          "pretrain.checkpoint_every_steps": 10, "pretrain.learning_rate": 0.002,
          "optimize.variants": ["int8", "onnx", "student", "pruned"]}


def report(root, stage: str) -> dict:
    return json.loads((root / "reports" / f"{stage}.json").read_text())


def curve(root, name: str) -> list[dict]:
    with open(root / "reports" / "pretrain" / name, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def pre_ln(tiny_trained, tmp_path_factory):
    """The tiny project's data and tokenizer, pretrained as pre-LN BERT (never interrupted)."""
    root = copy_outputs(tiny_trained, tmp_path_factory.mktemp("pre_ln") / "project")
    run_stage("pretrain", TINY, root, PRE_LN)
    return root


def test_pre_layernorm_pretraining_lowers_its_losses(pre_ln):
    config = json.loads((pre_ln / "artifacts/pretrained/config.json").read_text())
    assert config["model_type"] == "megatron-bert" and config["architectures"] == ["MegatronBertForPreTraining"]
    assert "bert.encoder.ln.weight" in load_file(pre_ln / "artifacts/pretrained/model.safetensors")  # the final LN
    train = curve(pre_ln, "train.csv")
    assert float(train[-1]["mlm_loss"]) < float(train[0]["mlm_loss"]) - 0.3
    figures = report(pre_ln, "pretrain")
    assert figures["heldout"]["mlm_loss"] < figures["heldout_at_start"]["mlm_loss"]


def test_pre_layernorm_pretraining_resumes_after_kill_with_the_same_weights(pre_ln, tmp_path):
    crashed = tmp_path / "crashed"
    for name in ("data", "artifacts/tokenizer"):
        shutil.copytree(pre_ln / name, crashed / name)
    kill_stage_after_first_checkpoint("pretrain", crashed, crashed / "artifacts/pretrain_checkpoints", PRE_LN)
    resumed = run_stage("pretrain", TINY, crashed, PRE_LN)
    assert 10 <= resumed["resumed_from_step"] < 30 and resumed["steps"] == 30
    a = load_file(pre_ln / "artifacts/pretrained/model.safetensors")
    b = load_file(crashed / "artifacts/pretrained/model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_pre_layernorm_runs_every_later_stage_and_is_served_without_bertflow(pre_ln, tmp_path, monkeypatch):
    from tests.registry.test_register import client_for, consume, register_here

    root = copy_outputs(pre_ln, tmp_path / "project")
    for stage in ("finetune", "evaluate", "attention", "optimize"):
        run_stage(stage, TINY, root, PRE_LN)
    for folder in ("artifacts/classifier", "artifacts/ablation/random_init", "artifacts/optimized/student",
                   "artifacts/optimized/pruned"):
        assert json.loads((root / folder / "config.json").read_text())["model_type"] == "megatron-bert", folder
    optimized = report(root, "optimize")
    assert set(optimized["variants"]) == {"fp32", "int8", "onnx", "student", "pruned"}
    assert optimized["onnx_max_abs_difference"] <= 1e-4  # the stage fails above optimize.onnx_tolerance
    assert report(root, "attention")  # every head's weights drawn from the pre-LN encoder

    registered = register_here(root, monkeypatch, overrides=PRE_LN)
    store = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    champion_version = client_for(store).get_model_version_by_alias("bertflow-tiny", "champion").version
    assert str(champion_version) == str(registered["version"])  # MLflow gives an int here, register.json a str
    with open(root / "reports/evaluate/predictions.csv", newline="", encoding="utf-8") as handle:
        saved = list(csv.DictReader(handle))[:8]
    for model_uri in ("models:/bertflow-tiny@champion", "models:/bertflow-tiny@fast"):
        served = consume(store, model_uri, [row["text"] for row in saved])
        assert len(served["label"]) == 8, model_uri
    champion = consume(store, "models:/bertflow-tiny@champion", [row["text"] for row in saved])
    assert champion["label"] == [row["predicted"] for row in saved]  # what evaluate saved, without bertflow


def test_a_checkpoint_of_the_other_family_is_refused_naming_both(pre_ln, tmp_path):
    root = tmp_path / "again"
    for name in ("data", "artifacts/tokenizer"):
        shutil.copytree(pre_ln / name, root / name)
    overrides = {**PRE_LN, "pretrain.architecture": "bert", "pretrain.init": str(pre_ln / "artifacts/pretrained")}
    with pytest.raises(InputError, match="pretrain.architecture is bert but the checkpoint of pretrain.init is "
                                         "megatron_bert; write megatron_bert there"):
        run_stage("pretrain", TINY, root, overrides)
    assert not (root / "artifacts/pretrained").exists()
