"""Stage optimize (tiny profile): every variant built, measured and loadable; ONNX agrees with PyTorch, fused or not;
distillation learns; pruning reaches its sparsity; a failing check leaves what was built."""

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from transformers import BertForSequenceClassification

from bertflow import compress
from bertflow.classification import read_split
from bertflow.compress import keep_fusion, layer_map, prunable
from bertflow.io import InputError
from bertflow.params import VARIANTS, load_params
from bertflow.paths import Paths
from bertflow.serving import OnnxRuntime, open_model, softmax
from tasks.cli import run_stage
from tests.conftest import REPO, copy_outputs

FIGURES = ("accuracy", "macro_f1", "latency_p50_ms_b1", "latency_p99_ms_b1", "throughput_b1", "throughput_b64",
           "size_mb", "speedup_b1", "accuracy_drop")


def report(root):
    """reports/optimize.json with its timings merged back (reports/timing/optimize.json), as readers see it."""
    from bertflow.tracking import read_report

    return read_report(Paths(root), "optimize")


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


def test_fused_onnx_graph_computes_the_unfused_probabilities(tiny_optimized, tmp_path):
    """ONNX Runtime's transformer fusions (tiny BERT: Attention, SkipLayerNormalization, ...) change the graph,
    not its answers: the fused graph's probabilities equal the unfused export's within optimize.onnx_tolerance
    at any batch and length, and the int8 form quantizes the fused graph (QAttention)."""
    tolerance = load_params(REPO / "params.tiny.yaml").optimize.onnx_tolerance
    classifier = tiny_optimized / "artifacts" / "classifier"
    teacher = BertForSequenceClassification.from_pretrained(str(classifier)).eval()
    unfused, fused, quantized = tmp_path / "unfused", tmp_path / "fused", tmp_path / "fused_int8"
    for folder in (unfused, fused, quantized):
        folder.mkdir()
    for folder in (unfused, fused):
        compress.onnx_variant(teacher, classifier, folder, 17)
    texts, _ = read_split(Paths(tiny_optimized), "test")
    texts = texts[:100] + ["word " * 300]
    batches = [(np.array([[2, 7, 9, 3]]), np.ones((1, 4), dtype=np.int64))]
    fusion = compress.fuse_export(fused, teacher.config, "on", batches, tolerance, 1, 1)
    assert fusion["applied"] and fusion["fused_operators"]["Attention"] == teacher.config.num_hidden_layers
    assert {"Attention", "SkipLayerNormalization"} <= {n.op_type for n in onnx.load(fused / "model.onnx").graph.node}
    assert not (fused / compress.FUSED_ONNX).exists()
    compress.onnx_int8_variant(fused, quantized, fusion=fusion)
    assert "QAttention" in {n.op_type for n in onnx.load(quantized / "model.onnx").graph.node}
    plain, fast = open_model(unfused), open_model(fused)
    for batch_size in (1, 7, 64):
        assert np.abs(plain.score(texts, batch_size) - fast.score(texts, batch_size)).max() <= tolerance, batch_size
    assert np.abs(plain.score(texts) - open_model(quantized).score(texts)).max() < 0.1  # int8: close, not equal
    assert json.loads((quantized / "variant.json").read_text())["fusion"]["applied"] is True


def test_the_onnx_variants_record_the_fusion_setting_and_the_figures_behind_it(tiny_optimized, tmp_path):
    optimized = tiny_optimized / "artifacts" / "optimized"
    auto = json.loads((optimized / "onnx" / "variant.json").read_text())["fusion"]
    assert auto["setting"] == "auto" and isinstance(auto["applied"], bool)
    assert auto["max_abs_difference"] <= load_params(REPO / "params.tiny.yaml").optimize.onnx_tolerance
    assert auto["applied"] == (auto["fused_seconds"] < auto["unfused_seconds"])  # auto: kept where faster
    assert json.loads((optimized / "onnx_int8" / "variant.json").read_text())["fusion"] == auto  # fuse, then quantize
    assert report(tiny_optimized)["variants"]["onnx"]["build"]["fusion"] == auto
    root = copy_outputs(tiny_optimized, tmp_path / "project")
    for setting in ("on", "off"):
        run_stage("optimize", REPO / "params.tiny.yaml", root,
                  {"optimize.variants": ["onnx_int8"], "optimize.onnx_fusion": setting, "optimize.rounds": 1})
        fusion = json.loads((root / "artifacts" / "optimized" / "onnx_int8" / "variant.json").read_text())["fusion"]
        assert fusion["setting"] == setting and fusion["applied"] is (setting == "on")
        graph = onnx.load(root / "artifacts" / "optimized" / "onnx_int8" / "model.onnx")
        assert ("QAttention" in {n.op_type for n in graph.graph.node}) is (setting == "on")


def test_keep_fusion_follows_the_setting_and_in_auto_the_clock_and_the_outputs():
    assert keep_fusion("on", 1.0, 2.0, 1.0, 1e-4) and not keep_fusion("off", 2.0, 1.0, 0.0, 1e-4)
    assert keep_fusion("auto", 2.0, 1.0, 1e-6, 1e-4)
    assert not keep_fusion("auto", 1.0, 2.0, 1e-6, 1e-4)  # slower
    assert not keep_fusion("auto", 2.0, 1.0, 1e-3, 1e-4)  # faster, but not the same answers


def test_fusion_on_a_megatron_bert_export_keeps_its_outputs(tmp_path):
    """MegatronBert (pre-LayerNorm, ``pretrain.architecture: megatron_bert``) matches fewer fusion patterns;
    whatever fires must leave the probabilities as they were."""
    from transformers import MegatronBertConfig, MegatronBertForSequenceClassification

    torch.manual_seed(0)
    config = MegatronBertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = MegatronBertForSequenceClassification(config).eval()
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    for folder in (plain, fused):
        folder.mkdir()
        compress.onnx_variant(model, tmp_path, folder, 17)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, (6, 20))
    mask = (np.arange(20) < rng.integers(4, 21, (6, 1))).astype(np.int64)
    fusion = compress.fuse_export(fused, config, "on", [(ids, mask)], 1e-4, 1, 1)
    assert fusion["applied"] and fusion["fused_operators"] and fusion["max_abs_difference"] <= 1e-5
    probabilities = [softmax(OnnxRuntime(folder, {"weights": "model.onnx"}, 1).logits(ids, mask))
                     for folder in (plain, fused)]
    assert np.abs(probabilities[0] - probabilities[1]).max() <= 1e-5
