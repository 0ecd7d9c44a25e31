"""``pretrain.objective`` on the tiny profile: mlm (single segments, no NSP, with the sequence-length schedule:
the first half of the steps on instances cut to 32 word pieces) and electra (on pre-LN BERT, the
combination the sweep wants) lower their losses and report the held-out figures they have; a killed run of
each resumes to the same weights (discriminator, generator and heads); the ELECTRA discriminator goes through finetune,
evaluate, attention, optimize (int8, ONNX within its tolerance), register and a consumer process without bertflow."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from safetensors.torch import load_file

from bertflow.io import InputError
from tasks.cli import run_stage
from tests.conftest import REPO, copy_outputs, kill_stage_after_first_checkpoint
from tests.model.test_architectures import curve, report

TINY = REPO / "params.tiny.yaml"
STEPS = {"pretrain.max_steps": 30, "pretrain.eval_every": 10, "pretrain.checkpoint_every_steps": 10}
MLM = {**STEPS, "pretrain.objective": "mlm", "pretrain_data.next_sentence": False,
       "pretrain.short_seq_fraction": 0.5, "pretrain.short_seq_length": 32}
ELECTRA = {**STEPS, "pretrain.objective": "electra", "pretrain.architecture": "megatron_bert",
           "finetune.random_init_ablation": False, "optimize.variants": ["int8", "onnx"]}


def weights(root) -> dict:
    """Every saved weight of the pretrained folder (ELECTRA: also the generator and the heads)."""
    folder = root / "artifacts/pretrained"
    found = load_file(folder / "model.safetensors")
    extras = folder / "electra" / "generator_and_heads.safetensors"
    return {**found, **({f"electra/{k}": v for k, v in load_file(extras).items()} if extras.is_file() else {})}


@pytest.fixture(scope="module")
def mlm(tiny_run, tmp_path_factory):
    """The tiny project rebuilt as single segments and pretrained with the masked LM alone."""
    root = copy_outputs(tiny_run, tmp_path_factory.mktemp("mlm") / "project")
    run_stage("pretrain_data", TINY, root, MLM)
    run_stage("pretrain", TINY, root, MLM)
    return root


@pytest.fixture(scope="module")
def electra(tiny_run, tmp_path_factory):
    """The tiny project pretrained with ELECTRA on pre-LN BERT (never interrupted)."""
    root = copy_outputs(tiny_run, tmp_path_factory.mktemp("electra") / "project")
    run_stage("pretrain", TINY, root, ELECTRA)
    return root


def test_mlm_on_single_segments_lowers_its_loss_and_reports_no_nsp(mlm):
    from bertflow.pretraining import read_shards

    data = report(mlm, "pretrain_data")
    assert data["segments"] == "single" and data["train"]["nsp_positive_rate"] is None
    rows = read_shards(mlm / "data/pretrain/train").slice(0, 50).to_pylist()
    assert all(set(row["token_type_ids"]) == {0} and row["input_ids"].count(3) == 1 for row in rows)  # one [SEP]
    train, evals = curve(mlm, "train.csv"), curve(mlm, "eval.csv")
    assert float(train[-1]["mlm_loss"]) < float(train[0]["mlm_loss"]) - 0.3
    assert {row["nsp_loss"] for row in train} == {""} and {row["nsp_accuracy"] for row in evals} == {""}
    figures = report(mlm, "pretrain")
    assert (figures["objective"], figures["inputs"]) == ("mlm", "single segments")
    assert figures["untrained_heads"] == ["nsp_head", "pooler"]
    assert figures["short_seq"] == {"length": 32, "fraction": 0.5, "steps": 15}  # steps 0-14 of 30
    assert "nsp_accuracy" not in figures["heldout"]
    assert figures["heldout"]["mlm_loss"] < figures["heldout_at_start"]["mlm_loss"]


def test_mlm_leaves_the_nsp_head_as_initialised(mlm):
    from transformers import AutoConfig

    from bertflow.model import construct_pretraining_model

    config = AutoConfig.from_pretrained(str(mlm / "artifacts/pretrained"))
    start = construct_pretraining_model(config, seed=42).state_dict()  # params.tiny.yaml's pretrain.seed
    saved = load_file(mlm / "artifacts/pretrained/model.safetensors")
    for key in ("cls.seq_relationship.weight", "bert.pooler.dense.weight"):
        assert (saved[key] == start[key]).all(), key
    assert not (saved["bert.encoder.layer.0.output.dense.weight"] == start["bert.encoder.layer.0.output.dense.weight"]
                ).all()


def resumes_to_the_same_weights(finished, overrides: dict, crashed) -> dict:
    """Kill a copy of ``finished``'s run after its first checkpoint, resume it, compare every saved weight."""
    for name in ("data", "artifacts/tokenizer"):
        shutil.copytree(finished / name, crashed / name)
    kill_stage_after_first_checkpoint("pretrain", crashed, crashed / "artifacts/pretrain_checkpoints", overrides)
    resumed = run_stage("pretrain", TINY, crashed, overrides)
    assert 10 <= resumed["resumed_from_step"] < 30 and resumed["steps"] == 30
    a, b = weights(finished), weights(crashed)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    return resumed


def test_mlm_with_the_length_schedule_resumes_after_kill_with_the_same_weights(mlm, tmp_path):
    resumed = resumes_to_the_same_weights(mlm, MLM, tmp_path / "crashed")
    assert resumed["short_seq"]["steps"] == 15


def test_mlm_nsp_refuses_single_segments_naming_both_keys(mlm, tmp_path):
    root = tmp_path / "again"
    for name in ("data", "artifacts/tokenizer"):
        shutil.copytree(mlm / name, root / name)
    with pytest.raises(InputError, match="pretrain.objective: mlm_nsp trains next-sentence prediction but "
                                         "pretrain_data.next_sentence is false"):
        run_stage("pretrain", TINY, root, STEPS)


def test_electra_lowers_its_losses_and_saves_the_discriminator_as_the_encoder(electra):
    folder = electra / "artifacts/pretrained"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "megatron-bert" and config["architectures"] == ["MegatronBertModel"]
    assert json.loads((folder / "pretraining.json").read_text())["objective"] == "electra"
    assert (folder / "electra/generator_config.json").is_file()
    train = curve(electra, "train.csv")
    assert float(train[-1]["rtd_loss"]) < float(train[0]["rtd_loss"]) - 0.1
    assert float(train[-1]["mlm_loss"]) < float(train[0]["mlm_loss"]) - 0.3
    figures = report(electra, "pretrain")
    assert figures["objective"] == "electra" and figures["generator"]["hidden_size"] == 16  # 1/4 of 64
    before, after = figures["heldout_at_start"], figures["heldout"]
    assert after["rtd_loss"] < before["rtd_loss"] and after["mlm_loss"] < before["mlm_loss"]
    assert 0 <= after["rtd_auc"] <= 1 and 0 < after["replaced_fraction"] < 1 and "nsp_accuracy" not in after


def test_electra_resumes_after_kill_with_the_same_weights(electra, tmp_path):
    resumes_to_the_same_weights(electra, ELECTRA, tmp_path / "crashed")
    assert any(key.startswith("electra/generator.") for key in weights(electra))


def test_electra_runs_every_later_stage_and_is_served_without_bertflow(electra, tmp_path, monkeypatch):
    from tests.registry.test_register import client_for, consume, register_here

    root = copy_outputs(electra, tmp_path / "project")
    for stage in ("finetune", "evaluate", "attention", "optimize"):
        run_stage(stage, TINY, root, ELECTRA)
    assert json.loads((root / "artifacts/classifier/config.json").read_text())["model_type"] == "megatron-bert"
    held = report(root, "evaluate")["pretrained_heldout"]
    assert held["objective"] == "electra" and held["mlm_of"] == "generator" and "nsp_accuracy" not in held
    assert 0 <= held["rtd_auc"] <= 1 and 0 < held["rtd_accuracy"] <= 1
    optimized = report(root, "optimize")
    assert set(optimized["variants"]) == {"fp32", "int8", "onnx"}
    assert optimized["onnx_max_abs_difference"] <= 1e-4  # the stage fails above optimize.onnx_tolerance

    registered = register_here(root, monkeypatch, overrides=ELECTRA)
    store = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    champion_version = client_for(store).get_model_version_by_alias("bertflow-tiny", "champion").version
    assert str(champion_version) == str(registered["version"])  # MLflow gives an int here, register.json a str
    with open(root / "reports/evaluate/predictions.csv", newline="", encoding="utf-8") as handle:
        saved = list(csv.DictReader(handle))[:8]
    champion = consume(store, "models:/bertflow-tiny@champion", [row["text"] for row in saved])
    assert champion["label"] == [row["predicted"] for row in saved]  # what evaluate saved, without bertflow


def test_the_electra_discriminator_learns_to_detect_replacements_where_that_is_easy():
    """A known answer for the loss itself, apart from any budget: on rows of one word piece repeated, a replaced
    piece is whatever differs from its neighbours. The replaced-token loss reaches the discriminator's encoder and
    not the generator (ELECTRA samples without a gradient), and the pre-LN discriminator trained on
    ``electra_loss`` (the generator's samples as the replacements, the stage's optimizer) separates replaced from
    original pieces (held-out ROC-AUC > 0.9 within 400 steps; 0.98 measured at 250): labels that do not belong to
    their positions stay at 0.5, as the collapsed 20-minute run of the sweep did."""
    import torch
    from transformers import MegatronBertConfig

    from bertflow import electra
    from bertflow import training as tr
    from bertflow.metrics import roc_auc

    config = MegatronBertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    model = electra.construct(config, 0.25, seed=0, attention="eager")
    optimizer = tr.adamw(model, 2e-3, 0.01)
    rows = torch.Generator().manual_seed(0)

    def batch() -> dict:
        ids = torch.randint(5, 55, (32, 1), generator=rows).expand(32, 48).clone()
        selected = torch.rand(32, 48, generator=rows) < 0.15
        return {"input_ids": torch.where(selected, torch.full_like(ids, 1), ids),  # 1: the mask piece here
                "labels": torch.where(selected, ids, torch.full_like(ids, -100)),
                "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    out = electra.electra_loss(model, batch(), electra.noise_generator("routing", model.device), 50.0)
    out.rtd_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in
               model.discriminator.encoder.named_parameters() if name.endswith("weight"))  # (a key bias's is 0)
    assert all(p.grad is None for p in model.generator.encoder.parameters())
    optimizer.zero_grad(set_to_none=True)
    for step in range(400):
        out = electra.electra_loss(model, batch(), electra.noise_generator(f"train/{step}", model.device), 50.0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        held = [electra.electra_loss(model, batch(), electra.noise_generator(f"held/{i}", model.device), 50.0)
                for i in range(4)]
    scores = torch.cat([out.rtd_scores for out in held]).numpy()
    labels = torch.cat([out.rtd_labels for out in held]).numpy()
    assert 0 < labels.mean() < 0.2  # the generator still replaces some pieces
    assert roc_auc(scores, labels) > 0.9
