"""Stages finetune and evaluate: learning a learnable set, label maps, mismatches, and evaluate's own figures."""

import csv
import json
import shutil

import pytest
from transformers import AutoConfig

from bertflow.cards import pretraining_verdict
from bertflow.io import InputError
from tasks.cli import run_stage
from tests.conftest import REPO, copy_outputs, kill_stage_after_first_checkpoint, tiny_profile, write_params

TINY = REPO / "params.tiny.yaml"

POSITIVE = ["good", "great", "fine", "happy", "nice", "best"]
NEGATIVE = ["bad", "poor", "sad", "worst", "awful", "wrong"]


def learnable_rows(count, offset=0):
    """Sentences whose label is given by one sentiment word among neutral filler."""
    fillers = ["the film was", "this story is", "the actors are", "my day was", "that city is", "the music was"]
    rows = []
    for i in range(offset, offset + count):
        words = POSITIVE if i % 2 else NEGATIVE
        rows.append((f"{fillers[i % 6]} {words[(i // 2) % 6]} and {fillers[(i // 3) % 6]} here", i % 2))
    return rows


def write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")


def test_learns_a_learnable_set_from_an_existing_checkpoint(tiny_trained, tmp_path):
    write_tsv(tmp_path / "train.tsv", learnable_rows(600))
    write_tsv(tmp_path / "dev.tsv", learnable_rows(100, 600))
    write_tsv(tmp_path / "test.tsv", learnable_rows(100, 700))
    params = tiny_profile()
    params["ingest"]["labeled"] = {"train": str(tmp_path / "train.tsv"), "dev": str(tmp_path / "dev.tsv"),
                                   "test": str(tmp_path / "test.tsv")}
    params["finetune"].update(init=str(tiny_trained / "artifacts" / "pretrained"), epochs=8, learning_rate=0.001,
                              early_stopping_patience=8, random_init_ablation=False)  # leaves 0.5 in 2-4 epochs
    path = write_params(tmp_path, params)
    root = tmp_path / "root"
    run_stage("ingest", path, root)
    figures = run_stage("finetune", path, root)
    assert figures["pretrained"]["best_dev_accuracy"] >= 0.9  # majority class is 0.5
    config = AutoConfig.from_pretrained(str(root / "artifacts" / "classifier"))
    assert config.id2label == {0: "0", 1: "1"} and config.label2id == {"0": 0, "1": 1}
    curve = list(csv.DictReader(open(root / "reports" / "finetune" / "pretrained.csv")))
    assert [int(r["epoch"]) for r in curve] == list(range(1, len(curve) + 1))


def test_finetune_refuses_a_checkpoint_whose_vocabulary_differs_from_its_tokenizer(tiny_trained, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_trained / "artifacts" / "pretrained", broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] = 2500
    (broken / "config.json").write_text(json.dumps(config))
    root = tmp_path / "root"
    shutil.copytree(tiny_trained / "data", root / "data")
    with pytest.raises(InputError, match="vocab_size 2500 but the tokenizer has 2000 tokens|size mismatch"):
        run_stage("finetune", REPO / "params.tiny.yaml", root, {"finetune.init": str(broken)})


def test_evaluate_figures_match_its_saved_predictions(tiny_trained):
    figures = json.loads((tiny_trained / "reports" / "evaluate.json").read_text())
    with open(tiny_trained / "reports" / "evaluate" / "predictions.csv", newline="", encoding="utf-8") as handle:
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == figures["test_rows"] == 872
    labels = sorted({p["label"] for p in predictions})
    correct = sum(p["label"] == p["predicted"] for p in predictions)
    assert figures["test"]["accuracy"] == round(correct / len(predictions), 5)
    f1s = []
    for label in labels:
        tp = sum(p["label"] == label == p["predicted"] for p in predictions)
        predicted = sum(p["predicted"] == label for p in predictions)
        actual = sum(p["label"] == label for p in predictions)
        f1s.append(0 if tp == 0 else 2 * tp / (predicted + actual))
        assert figures["test"]["per_class"][label]["support"] == actual
    assert figures["test"]["macro_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-5)
    matrix = [[sum(p["label"] == a and p["predicted"] == b for p in predictions) for b in labels] for a in labels]
    assert figures["test"]["confusion_matrix"] == matrix
    assert all(abs(sum(float(p[f"score_{label}"]) for label in labels) - 1) < 1e-5 for p in predictions)
    assert set(figures["baselines"]) == {"majority", "tfidf_logreg", "random_init"}
    assert figures["baselines"]["majority"]["accuracy"] == round(444 / 872, 5)
    assert_honest_comparisons(figures, predictions)
    gain, ablation = figures["pretraining_gain"], figures["baselines"]["random_init"]
    assert gain["seeds"] == [42]  # one seed: the paired sign-flip test is McNemar's against the ablation
    assert (gain["p_value"], gain["better"]) == (ablation["mcnemar"]["p_value"], ablation["mcnemar"]["better"])
    assert gain["gain"] == pytest.approx(figures["test"]["accuracy"] - ablation["accuracy"], abs=2e-5)
    assert gain["tfidf_logreg"]["p_value"] == figures["baselines"]["tfidf_logreg"]["mcnemar"]["p_value"]
    assert 0 < figures["pretrained_heldout"]["mlm_accuracy"] < 1 and figures["pretrained_heldout"]["mlm_perplexity"] > 1
    assert (tiny_trained / "reports" / "evaluate" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def assert_honest_comparisons(figures, predictions):
    """The accuracy's bootstrap interval is sane; each McNemar test's counts agree with the accuracies."""
    accuracy, rows = figures["test"]["accuracy"], len(predictions)
    interval = figures["test"]["accuracy_interval"]
    assert (interval["level"], interval["resamples"], interval["seed"]) == (0.95, 10_000, 0)
    assert interval["lower"] < accuracy < interval["upper"]
    half = 1.96 * (accuracy * (1 - accuracy) / rows) ** 0.5  # the normal approximation
    assert (interval["upper"] - interval["lower"]) / 2 == pytest.approx(half, rel=0.15)
    for name, baseline in figures["baselines"].items():
        test = baseline["mcnemar"]
        assert (test["b"] - test["c"]) / rows == pytest.approx(accuracy - baseline["accuracy"], abs=2e-5), name
        assert 0 < test["p_value"] <= 1 and test["better"] in ("classifier", "baseline", "neither at 5 %"), name
        assert (test["better"] == "neither at 5 %") == (test["p_value"] >= 0.05), name
    majority = figures["baselines"]["majority"]
    right = [p["label"] == p["predicted"] for p in predictions]
    is_majority = [p["label"] == majority["predicts"] for p in predictions]
    assert majority["mcnemar"]["b"] == sum(r and not m for r, m in zip(right, is_majority, strict=True))
    assert majority["mcnemar"]["c"] == sum(m and not r for r, m in zip(right, is_majority, strict=True))


def test_several_fine_tuning_seeds_give_pretrainings_gain_over_all_of_them(tiny_trained, tmp_path):
    """finetune.seeds: 2 fine-tunes the classifier and its random-init twin twice; the first seed's classifier
    is the one-seed run's, and evaluate tests pretraining's gain over both seeds; a missing seed is named."""
    root = copy_outputs(tiny_trained, tmp_path / "root")
    overrides = {"finetune.seeds": 2}
    finetuned = run_stage("finetune", TINY, root, overrides)
    assert finetuned["seeds"] == [42, 43]
    assert {"pretrained", "random_init", "pretrained_seed43", "random_init_seed43"} <= set(finetuned)
    weights = "model.safetensors"
    assert (root / "artifacts/classifier" / weights).read_bytes() == \
        (tiny_trained / "artifacts/classifier" / weights).read_bytes()  # more seeds leave the registered one alone
    replica = root / "artifacts/ablation/seeds/pretrained_seed43"
    assert (replica / weights).read_bytes() != (root / "artifacts/classifier" / weights).read_bytes()
    assert json.loads((root / "artifacts/ablation/ablation.json").read_text()) == {"random_init": True,
                                                                                   "seeds": [42, 43]}
    figures = run_stage("evaluate", TINY, root, overrides)
    gain = figures["pretraining_gain"]
    assert gain["seeds"] == [42, 43] and gain["classifier_accuracy_by_seed"][0] == figures["test"]["accuracy"]
    assert gain["random_init_accuracy_by_seed"][0] == figures["baselines"]["random_init"]["accuracy"]
    assert gain["classifier_accuracy"] == pytest.approx(sum(gain["classifier_accuracy_by_seed"]) / 2, abs=1e-5)
    assert gain["gain"] == pytest.approx(gain["classifier_accuracy"] - gain["other_accuracy"], abs=2e-5)
    assert gain["gain_interval"]["lower"] <= gain["gain"] <= gain["gain_interval"]["upper"]
    assert (gain["better"] == "neither at 5 %") == (gain["p_value"] >= 0.05)
    with open(root / "reports/evaluate/seeds.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))  # what a paired test between two pipeline runs needs
    assert list(rows[0]) == ["id", "pretrained_seed42", "pretrained_seed43", "random_init_seed42",
                             "random_init_seed43"] and len(rows) == figures["test_rows"]
    for column, accuracy in (("pretrained_seed43", gain["classifier_accuracy_by_seed"][1]),
                             ("random_init_seed42", gain["random_init_accuracy_by_seed"][0])):
        assert sum(int(row[column]) for row in rows) / len(rows) == pytest.approx(accuracy, abs=1e-5)
    verdict = pretraining_verdict(figures)
    assert verdict.startswith(("Pretraining paid", "Pretraining cost", "Pretraining did not pay")), verdict
    assert "2 seeds" in verdict and "TF-IDF" in verdict
    shutil.rmtree(root / "artifacts/ablation/seeds/random_init_seed43")
    with pytest.raises(InputError, match="random_init_seed43: artifacts/ablation/ablation.json lists seed 43"):
        run_stage("evaluate", TINY, root, overrides)


def test_evaluate_is_deterministic(tiny_trained, tmp_path):
    root = tmp_path / "again"
    for name in ("data", "artifacts"):
        shutil.copytree(tiny_trained / name, root / name)
    again = run_stage("evaluate", REPO / "params.tiny.yaml", root)
    assert again == json.loads((tiny_trained / "reports" / "evaluate.json").read_text())
    for name in ("predictions.csv", "confusion.png"):
        assert (root / "reports" / "evaluate" / name).read_bytes() == \
            (tiny_trained / "reports" / "evaluate" / name).read_bytes()


def test_finetune_resumes_after_kill_with_the_same_weights(tiny_trained, tmp_path):
    from safetensors.torch import load_file

    # checkpoints four times as often as the tiny profile and no ablation (each classifier seeds its own
    # run): the resumed weights must equal the session's straight tiny run all the same
    overrides = {"finetune.checkpoint_every_steps": 5, "finetune.random_init_ablation": False}
    straight = tiny_trained
    crashed = tmp_path / "crashed"
    shutil.copytree(tiny_trained / "data", crashed / "data")
    shutil.copytree(tiny_trained / "artifacts" / "pretrained", crashed / "artifacts" / "pretrained")
    checkpoints = crashed / "artifacts" / "finetune_checkpoints" / "pretrained"
    kill_stage_after_first_checkpoint("finetune", crashed, checkpoints, overrides)
    figures = run_stage("finetune", REPO / "params.tiny.yaml", crashed, overrides)
    assert figures["pretrained"]["resumed_from_step"] >= 5
    a = load_file(straight / "artifacts" / "classifier" / "model.safetensors")
    b = load_file(crashed / "artifacts" / "classifier" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    straight_curve = list(csv.DictReader(open(straight / "reports" / "finetune" / "pretrained.csv")))
    crashed_curve = list(csv.DictReader(open(crashed / "reports" / "finetune" / "pretrained.csv")))
    assert [r["dev_accuracy"] for r in crashed_curve] == [r["dev_accuracy"] for r in straight_curve]
