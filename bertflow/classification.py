"""Classifier inputs and inference: encoding labeled texts, padded batches, length-sorted prediction.

Reads ``data/labeled/<split>.parquet`` (``read_split``); writes nothing. Used by finetune, evaluate,
optimize and the compression transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bertflow import training as tr
from bertflow.io import read_column
from bertflow.paths import Paths


@dataclass
class Encoded:
    """Token ids of one labeled split (with [CLS]/[SEP], truncated) and label ids."""

    input_ids: list[list[int]]
    labels: list[int]

    def batch(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            ids = self.input_ids[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids),
                "labels": torch.tensor([self.labels[i] for i in indices])}


def encode(tokenizer, texts: list[str], labels: list[int], max_seq_length: int) -> Encoded:
    ids = tokenizer(texts, truncation=True, max_length=max_seq_length)["input_ids"]
    return Encoded(ids, labels)


def class_weights(labels: list[int], num_labels: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    return torch.tensor(len(labels) / (num_labels * np.maximum(counts, 1)), dtype=torch.float32)


@torch.no_grad()
def predict_logits(model, data: Encoded, pad_id: int, batch_size: int, bf16: bool = False) -> np.ndarray:
    """Logits for every row, computed in length-sorted batches (little padding) on the model's device,
    returned in row order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data.input_ids)), key=lambda i: len(data.input_ids[i]))
    out = np.zeros((len(order), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = tr.to_device(data.batch(indices, pad_id), model.device)
        with tr.autocast(bf16, model.device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
        out[indices] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def read_split(paths: Paths, split: str) -> tuple[list[str], list[int]]:
    path = paths.labeled / f"{split}.parquet"
    return read_column(path, "text"), read_column(path, "label_id")
