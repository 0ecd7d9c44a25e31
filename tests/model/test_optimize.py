"""Stage optimize (tiny profile): every variant built, measured and loadable; ONNX agrees with PyTorch;
distillation learns; pruning reaches its sparsity; a failing check leaves what was built."""

import csv
import json

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from bertflow.classification import read_split
from bertflow.compress import layer_map, prunable
from bertflow.io import InputError
from bertflow.params import VARIANTS, load_params
from bertflow.paths import Paths
from bertflow.serving import open_model
from tasks.cli import run_stage
from tests.conftest import REPO, copy_outputs

FIGURES = ("accuracy", "macro_f1", "latency_p50_ms_b1", "latency_p99_ms_b1", "throughput_b1", "throughput_b64",
           "size_mb", "speedup_b1", "accuracy_drop")


def report(root):
    return json.loads((root / "reports" / "optimize.json").read_text())


def test_every_variant_is_built_measured_and_loadable(tiny_optimized):
    figures = report(tiny_optimized)["variants"]
    assert set(figures) == {"fp32", *VARIANTS}
    for name, row in figures.items():
        assert all(key in row for key in FIGURES), name
        assert 0 < row["latency_p50_ms_b1"] <= row["latency_p99_ms_b1"] and row["throughput_b64"] > 0, name
    # the reference row is evaluate's figure: the same test split, the same metric code
    evaluation = json.loads((tiny_optimized / "reports" / "evaluate.json").read_text())["test"]
    assert (figures["fp32"]["accuracy"], figures["fp32"]["macro_f1"]) == (evaluation["accuracy"],
                                                                          evaluation["macro_f1"])
    assert figures["int8"]["size_mb"] < figures["fp32"]["size_mb"]
    assert figures["onnx_int8"]["size_mb"] < figures["onnx"]["size_mb"] / 2
    texts = ["a charming and often affecting journey", "dull", "an " * 200]
    for name in VARIANTS:
        model = open_model(tiny_optimized / "artifacts" / "optimized" / name)
        frame = model.frame(texts)
        assert list(frame.columns) == ["label", "score_0", "score_1", "truncated"], name
        assert np.allclose(frame[["score_0", "score_1"]].sum(axis=1), 1.0) and set(frame["label"]) <= {"0", "1"}
    runtimes = {name: row["runtime"] for name, row in figures.items()}
    assert runtimes == {"fp32": "torch", "int8": "torch_int8", "onnx": "onnxruntime", "onnx_int8": "onnxruntime",
                        "student": "torch", "pruned": "torch"}


def test_onnx_agrees_with_pytorch_at_any_batch_and_length(tiny_optimized):
    tolerance = load_params(REPO / "params.tiny.yaml").optimize.onnx_tolerance
    assert report(tiny_optimized)["onnx_max_abs_difference"] <= tolerance
    texts, _ = read_split(Paths(tiny_optimized), "test")
    texts = texts[:150] + ["word " * 300]  # the last one is truncated at max_position_embeddings
    torch_model = open_model(tiny_optimized / "artifacts" / "classifier")
    onnx_model = open_model(tiny_optimized / "artifacts" / "optimized" / "onnx")
    for batch_size in (1, 7, 64):
        difference = np.abs(torch_model.score(texts, batch_size) - onnx_model.score(texts, batch_size)).max()
        assert difference <= tolerance, batch_size
    int8 = open_model(tiny_optimized / "artifacts" / "optimized" / "onnx_int8")
    assert np.abs(int8.score(texts) - torch_model.score(texts)).max() < 0.1  # int8: close, not equal


def test_distillation_learns_and_the_student_beats_the_majority_class(tiny_optimized):
    with open(tiny_optimized / "reports" / "optimize" / "distill.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) >= 6 and np.mean(losses[-3:]) < np.mean(losses[:3])
    figures = report(tiny_optimized)["variants"]["student"]
    majority = json.loads((tiny_optimized / "reports" / "evaluate.json").read_text())["baselines"]["majority"]
    assert figures["accuracy"] > majority["accuracy"]
    student = BertForSequenceClassification.from_pretrained(str(tiny_optimized / "artifacts/optimized/student"))
    assert student.config.num_hidden_layers == 1 and figures["build"]["layers_from"] == [0]
    assert figures["build"]["initialized_share"] > 0.9  # same width: all but the classifier head from pretraining
    assert figures["build"]["unlabeled_rows"] > 0
    assert layer_map(4, 2) == [0, 2] and layer_map(12, 6) == [0, 2, 4, 6, 8, 10] and layer_map(4, 4) == [0, 1, 2, 3]


def test_pruning_reaches_its_sparsity_and_reports_its_speed(tiny_optimized):
    sparsity = load_params(REPO / "params.tiny.yaml").optimize.prune.sparsity
    pruned = BertForSequenceClassification.from_pretrained(str(tiny_optimized / "artifacts/optimized/pruned"))
    weights = [module.weight for module, _ in prunable(pruned)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - sparsity) < 0.01
    assert torch.count_nonzero(pruned.bert.embeddings.word_embeddings.weight) > 0  # only the encoder's linears
    figures = report(tiny_optimized)["variants"]["pruned"]
    assert figures["build"]["recovery_steps"] > 0 and "speedup_b1" in figures and "speedup_b64" in figures


def test_an_onnx_export_outside_tolerance_fails_and_keeps_what_was_built(tiny_optimized, tmp_path):
    root = copy_outputs(tiny_optimized, tmp_path / "project")
    before = sorted(p.relative_to(root) for p in (root / "artifacts" / "optimized").rglob("*"))
    kept_report = (root / "reports" / "optimize.json").read_text()
    with pytest.raises(InputError, match="optimize.onnx_tolerance"):
        run_stage("optimize", REPO / "params.tiny.yaml", root,
                  {"optimize.variants": ["onnx"], "optimize.onnx_tolerance": 1e-15})
    assert sorted(p.relative_to(root) for p in (root / "artifacts" / "optimized").rglob("*")) == before
    assert (root / "reports" / "optimize.json").read_text() == kept_report
    assert not [p for p in (root / "artifacts").iterdir() if p.name.startswith(".")]  # no staged leftovers


def test_optimize_without_a_classifier_names_the_missing_stage(tmp_path):
    with pytest.raises(InputError, match="artifacts/classifier: no classifier; run `bertflow finetune` first"):
        run_stage("optimize", REPO / "params.tiny.yaml", tmp_path)
