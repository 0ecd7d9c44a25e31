"""Classification metrics: accuracy, macro-F1, per-class report, confusion matrix, the headline figures.

Pure numpy and scikit-learn; reads and writes nothing.
"""

from __future__ import annotations

import numpy as np
import sklearn.metrics as skm


def classification_metrics(labels: np.ndarray, predicted: np.ndarray, num_labels: int) -> dict:
    """Accuracy and macro-F1 (plain numpy, so evaluate can check them against scikit-learn)."""
    f1s = []
    for c in range(num_labels):
        tp = np.sum((predicted == c) & (labels == c))
        precision = tp / max(np.sum(predicted == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(np.mean(f1s))}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def classification_report(labels: np.ndarray, predicted: np.ndarray, scores: np.ndarray | None,
                          names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix; ROC-AUC when binary."""
    ids = list(range(len(names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted, labels=ids,
                                                                         zero_division=0)
    report = {
        "accuracy": round(float(skm.accuracy_score(labels, predicted)), 5),
        "macro_f1": round(float(skm.f1_score(labels, predicted, labels=ids, average="macro", zero_division=0)), 5),
        "per_class": {name: {"precision": round(float(p), 5), "recall": round(float(r), 5), "f1": round(float(f), 5),
                             "support": int(s)} for name, p, r, f, s in zip(names, precision, recall, f1, support,
                                                                             strict=True)},
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=ids).tolist(),
    }
    if scores is not None and len(names) == 2 and len(set(labels.tolist())) == 2:
        report["roc_auc"] = round(float(skm.roc_auc_score(labels, scores[:, 1])), 5)
    return report


def headline(report: dict) -> dict:
    """Accuracy, macro-F1 and (binary) ROC-AUC of a ``classification_report``."""
    return {key: report[key] for key in ("accuracy", "macro_f1", "roc_auc") if key in report}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive): the chance that a random
    positive scores above a random negative, ties counting half (Mann-Whitney U over average ranks).
    None when one class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    unique, inverse = np.unique(scores, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks, minlength=len(unique))
    ranks = (sums / np.bincount(inverse, minlength=len(unique)))[inverse]  # ties share their mean rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))
