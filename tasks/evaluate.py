"""Stage evaluate: the classifier on the test split, the pretrained model on held-out text, and baselines.

Reads: ``artifacts/classifier``, ``artifacts/ablation`` (the random-init classifier, when built, and the
models of further fine-tuning seeds, ``finetune.seeds``), ``artifacts/pretrained``,
``data/labeled/{train,test}.parquet``, ``data/pretrain/heldout``.
Writes: ``reports/evaluate/`` (``predictions.csv`` with id, text, label, predicted and per-class
scores; ``seeds.csv``, right or wrong per row for each fine-tuning seed of the classifier and of its
random-init twin; ``confusion.json``; ``confusion.png``) and ``reports/evaluate.json``, where the test accuracy
carries a seeded 95 % bootstrap interval, each baseline McNemar's exact test against the classifier
on the same rows, and ``pretraining_gain`` what pretraining bought over random init across every seed
(mean accuracies, the gain with its interval, the exact paired sign-flip test; the same against TF-IDF;
``bertflow/statistics.py``). Everything runs in fp32 with a fixed thread count, so two runs give
identical figures. Run: ``bertflow evaluate``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from bertflow import training as tr
from bertflow.classification import encode, predict_logits, read_split
from bertflow.io import InputError, atomic_dirs, read_json, write_json
from bertflow.metrics import classification_report, headline, softmax
from bertflow.model import load_classifier
from bertflow.params import EvaluateParams
from bertflow.paths import Paths
from bertflow.statistics import accuracy_interval, mcnemar, paired_runs
from bertflow.tokenization import load_tokenizer

# ---------------------------------------------------------------- figures (pure)


def majority_baseline(train_labels: list[int], test_labels: np.ndarray, names: list[str]) -> tuple[dict, np.ndarray]:
    """Headline figures and per-row predictions of always predicting the most frequent train label."""
    majority = int(np.bincount(train_labels).argmax())
    predicted = np.full_like(test_labels, majority)
    figures = {"predicts": names[majority], **headline(classification_report(test_labels, predicted, None, names))}
    return figures, predicted


def tfidf_baseline(train: tuple[list[str], list[int]], test: tuple[list[str], np.ndarray], names: list[str],
                   params: EvaluateParams) -> tuple[dict, np.ndarray]:
    """TF-IDF (sublinear tf, word n-grams, or character n-grams for unsegmented text) + logistic regression.

    Returns the headline figures and the per-row predictions on the test split.
    """
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, params.tfidf_ngram_max),
                                 analyzer=params.tfidf_analyzer)
    features = vectorizer.fit_transform(train[0])
    classifier = LogisticRegression(C=params.tfidf_c, max_iter=5000).fit(features, train[1])
    test_features = vectorizer.transform(test[0])
    predicted = classifier.predict(test_features)
    scores = classifier.predict_proba(test_features)
    return headline(classification_report(test[1], predicted, scores, names)), predicted


def against(labels: np.ndarray, predicted: np.ndarray, baselines: dict[str, tuple[dict, np.ndarray]]) -> dict:
    """Each baseline's figures with McNemar's exact test of the classifier's ``predicted`` against it."""
    correct = predicted == labels
    return {name: {**figures, "mcnemar": mcnemar(correct, guesses == labels)}
            for name, (figures, guesses) in baselines.items()}


# ---------------------------------------------------------------- outputs


def write_predictions(path: Path, texts: list[str], labels: np.ndarray, scores: np.ndarray, names: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label", "predicted", *[f"score_{name}" for name in names]])
        for i, (text, label, row) in enumerate(zip(texts, labels, scores, strict=True)):
            writer.writerow([i, text, names[label], names[int(row.argmax())], *[f"{s:.7f}" for s in row]])


def write_seed_correctness(path: Path, correct: dict[str, np.ndarray], seeds: list[int]) -> None:
    """Right (1) or wrong (0) per test row for each kind's fine-tuning seed: what a paired test between two runs
    of the pipeline needs (``benchmarks/pretraining_sweep.py`` compares recipes with it)."""
    columns = [f"{kind}_seed{seeds[i]}" if i < len(seeds) else kind for kind, rows in correct.items()
               for i in range(len(rows))]  # no seeds recorded (finetune without ablation.json): one per kind
    table = np.stack([row for rows in correct.values() for row in rows], axis=1).astype(int)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *columns])
        writer.writerows([i, *flags] for i, flags in enumerate(table.tolist()))


def plot_confusion(path: Path, matrix: list[list[int]], names: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(2 + 0.8 * len(names), 1.6 + 0.8 * len(names)), dpi=120)
    axis.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center",
                      color="white" if count > max(map(max, matrix)) / 2 else "black")
    axis.set_xticks(range(len(names)), names)
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true label")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})  # no version/date stamp: same input, same bytes
    plt.close(figure)


# ---------------------------------------------------------------- edge


def evaluate_classifier(folder: Path, test: tuple[list[str], list[int]], params: EvaluateParams, names: list[str]):
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no classifier; run `bertflow finetune` first")
    tokenizer = load_tokenizer(folder)
    model = load_classifier(folder)
    if model.config.id2label and [model.config.id2label[i] for i in range(len(names))] != names:
        raise InputError(f"{folder}: trained for labels {list(model.config.id2label.values())}, "
                         f"but data/labeled/labels.json has {names}; re-run `bertflow finetune`")
    encoded = encode(tokenizer, test[0], test[1], model.config.max_position_embeddings)
    scores = softmax(predict_logits(model, encoded, tokenizer.pad_token_id, params.batch_size, bf16=False))
    labels = np.array(test[1])
    return classification_report(labels, scores.argmax(1), scores, names), scores


def evaluate_pretrained(paths: Paths, params: EvaluateParams) -> dict:
    """The pretrained model's held-out figures (fp32) for the objective that trained it (its ``pretraining.json``):
    MLM accuracy, loss and perplexity (ELECTRA: the generator's), NSP accuracy with NSP, and with ELECTRA the
    replaced-token detection's accuracy and ROC-AUC."""
    from transformers import AutoModelForPreTraining

    from bertflow.pretraining import PretrainBatches, evaluate_pretraining, read_objective, read_shards

    if not (paths.pretrained / "config.json").is_file():
        raise InputError(f"{paths.pretrained}: no pretrained model; run `bertflow pretrain` first")
    objective = read_objective(paths.pretrained)
    if objective.electra:
        from bertflow import electra

        model = electra.load(paths.pretrained)
    else:
        model = AutoModelForPreTraining.from_pretrained(str(paths.pretrained))
    tokenizer = load_tokenizer(paths.pretrained)
    heldout = PretrainBatches(read_shards(paths.pretrain_data / "heldout"), tokenizer.pad_token_id, None, seed=0)
    figures = evaluate_pretraining(model, heldout, params.heldout_instances, params.batch_size, bf16=False,
                                   objective=objective)
    found = {"mlm_accuracy": figures["mlm_accuracy"], "mlm_loss": figures["mlm_loss"],
             "mlm_perplexity": round(math.exp(figures["mlm_loss"]), 3)}
    found.update({key: figures[key] for key in ("nsp_accuracy", "rtd_accuracy", "rtd_auc", "rtd_loss",
                                                "replaced_fraction") if key in figures})
    if objective.electra:
        found["mlm_of"] = "generator"
    return {"objective": objective.name, **found, "instances": figures["instances"]}


def score_baselines(paths: Paths, params: EvaluateParams, train: tuple[list[str], list[int]],
                    test: tuple[list[str], list[int]], labels: np.ndarray,
                    names: list[str]) -> dict[str, tuple[dict, np.ndarray]]:
    """Each baseline that is on (and the random-init ablation, when built): headline figures, per-row predictions."""
    found = {}
    random_init = paths.ablation / "random_init"
    if (random_init / "config.json").is_file():
        report, scores = evaluate_classifier(random_init, test, params, names)
        found["random_init"] = headline(report), scores.argmax(1)
    if params.majority_baseline:
        found["majority"] = majority_baseline(train[1], labels, names)
    if params.tfidf_baseline:
        found["tfidf_logreg"] = tfidf_baseline(train, (test[0], labels), names, params)
    return found


def ablation_seeds(paths: Paths) -> list[int]:
    """The fine-tuning seeds finetune ran (``ablation.json``; empty for one written before ``finetune.seeds``)."""
    record = paths.ablation / "ablation.json"
    return read_json(record).get("seeds", []) if record.is_file() else []


def seed_correctness(paths: Paths, params: EvaluateParams, test: tuple[list[str], list[int]], names: list[str],
                     first: dict[str, np.ndarray], seeds: list[int]) -> dict[str, np.ndarray]:
    """Right/wrong per test row, one row per fine-tuning seed, for each kind in ``first`` (pretrained,
    random_init: the first seed's flags, already scored); the further seeds' models are scored here."""
    labels = np.array(test[1])
    found = {}
    for kind, correct in first.items():
        rows = [correct]
        for seed in seeds[1:]:
            folder = paths.replica(kind, seed)
            if not (folder / "config.json").is_file():
                raise InputError(f"{folder}: artifacts/ablation/ablation.json lists seed {seed} but its model is not "
                                 "there; run `bertflow finetune` again")
            rows.append(evaluate_classifier(folder, test, params, names)[1].argmax(1) == labels)
        found[kind] = np.stack(rows)
    return found


def pretraining_gain(correct: dict[str, np.ndarray], baselines: dict[str, tuple[dict, np.ndarray]],
                     labels: np.ndarray, seeds: list[int], params: EvaluateParams) -> dict | None:
    """What pretraining bought: the classifier against its random-init twin over every seed (mean accuracies,
    the gain with its interval, the exact paired test), and the same classifiers against TF-IDF; None without
    the ablation."""
    if "random_init" not in correct:
        return None
    ours = correct["pretrained"]
    settings = {"resamples": params.bootstrap_resamples, "seed": params.bootstrap_seed}
    found = {**paired_runs(ours, correct["random_init"], **settings), "seeds": seeds[:len(ours)],
             "classifier_accuracy_by_seed": [round(float(r.mean()), 5) for r in ours],
             "random_init_accuracy_by_seed": [round(float(r.mean()), 5) for r in correct["random_init"]]}
    if "tfidf_logreg" in baselines:
        found["tfidf_logreg"] = paired_runs(ours, baselines["tfidf_logreg"][1] == labels, **settings)
    return found


def run(params: EvaluateParams, paths: Paths) -> dict:
    tr.set_threads(params.num_threads)
    torch.manual_seed(0)
    names = read_json(paths.labeled / "labels.json")["labels"]
    train, test = read_split(paths, "train"), read_split(paths, "test")
    report, scores = evaluate_classifier(paths.classifier, test, params, names)
    labels, predicted = np.array(test[1]), scores.argmax(1)
    report["accuracy_interval"] = accuracy_interval(predicted == labels, params.bootstrap_resamples,
                                                    params.bootstrap_seed)
    baselines = score_baselines(paths, params, train, test, labels, names)
    figures = {"test": report, "test_rows": len(test[1]), "baselines": against(labels, predicted, baselines)}
    first = {"pretrained": predicted == labels}
    if "random_init" in baselines:
        first["random_init"] = baselines["random_init"][1] == labels
    seeds = ablation_seeds(paths)
    correct = seed_correctness(paths, params, test, names, first, seeds)
    gain = pretraining_gain(correct, baselines, labels, seeds, params)
    if gain is not None:
        figures["pretraining_gain"] = gain
    figures["pretrained_heldout"] = evaluate_pretrained(paths, params)
    with atomic_dirs([paths.reports / "evaluate"]) as (folder,):
        write_predictions(folder / "predictions.csv", test[0], labels, scores, names)
        write_seed_correctness(folder / "seeds.csv", correct, seeds)
        write_json(folder / "confusion.json", {"labels": names, "matrix": report["confusion_matrix"]})
        plot_confusion(folder / "confusion.png", report["confusion_matrix"], names,
                       f"test accuracy {report['accuracy']:.3f}")
    return figures
