"""Pretraining batches over the stored instances, and held-out MLM/NSP scoring.

Reads ``data/pretrain/<split>/*.arrow`` shards; writes nothing. Used by stages pretrain (training and
its held-out curve) and evaluate (the held-out figures of the saved model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from bertflow import training as tr
from bertflow.io import InputError
from bertflow.masking import MaskingSpec, mask_tokens
from bertflow.model import pretraining_loss


def read_shards(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise InputError(f"{folder}: no shards; run `bertflow pretrain_data` first")
    tables = [pa.ipc.open_stream(pa.OSFile(str(f))).read_all() for f in files]
    return pa.concat_tables(tables).combine_chunks()


@dataclass
class PretrainBatches:
    """Padded batches from the stored instances; masks applied here when the data is unmasked."""

    table: pa.Table
    pad_id: int
    masking: MaskingSpec | None  # None: the shards carry static masks
    seed: int

    def __len__(self) -> int:
        return self.table.num_rows

    def order(self, epoch: int, batch_size: int) -> list[int]:
        """This epoch's order: shuffled, consecutive ``batch_size`` groups of similar length (little padding)."""
        return tr.epoch_order(self.lengths, batch_size, self.seed, epoch)

    @cached_property
    def lengths(self) -> list[int]:
        return pc.list_value_length(self.table.column("input_ids")).to_pylist()

    def batch(self, indices: list[int], mask_seed: str) -> dict[str, torch.Tensor]:
        """Rows ``indices``; dynamic masks drawn per row from (``mask_seed``, row), so a row gets the same
        mask whichever process, batch slice or position it lands in."""
        rows = self.table.take(indices).to_pylist()
        examples = [self._masked(row, random.Random(f"{mask_seed}/{i}")) for i, row in zip(indices, rows, strict=True)]
        return collate(examples, self.pad_id)

    def _masked(self, row: dict, rng: random.Random) -> tuple[list[int], list[int], list[int], list[int], int]:
        if self.masking is not None:
            ids, positions, originals = mask_tokens(row["input_ids"], self.masking, rng)
        else:
            ids, positions, originals = row["input_ids"], row["masked_lm_positions"], row["masked_lm_ids"]
        return ids, row["token_type_ids"], positions, originals, row["next_sentence_label"]


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example (dynamic padding); labels are -100 except at masked positions."""
    width = max(len(ids) for ids, *_ in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (ids, segments, positions, originals, _) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        token_type_ids[i, : len(ids)] = torch.tensor(segments)
        attention_mask[i, : len(ids)] = 1
        labels[i, positions] = torch.tensor(originals, dtype=torch.long)
    nsp = torch.tensor([example[4] for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels, "next_sentence_label": nsp}


@torch.no_grad()
def evaluate_pretraining(model, batches: PretrainBatches, limit: int | None, batch_size: int, bf16: bool) -> dict:
    """Held-out MLM loss/accuracy (token-weighted) and NSP accuracy, on the first ``limit`` instances
    (computed on the model's device)."""
    was_training = model.training
    model.eval()
    count = min(limit or len(batches), len(batches))
    mlm_loss = mlm_correct = mlm_count = nsp_correct = 0.0
    for start in range(0, count, batch_size):
        batch = tr.to_device(batches.batch(list(range(start, min(start + batch_size, count))), mask_seed="eval"),
                             model.device)
        with tr.autocast(bf16, model.device):
            out = pretraining_loss(model, batch)
        mlm_loss += float(out.mlm_loss) * out.mlm_count
        mlm_correct += out.mlm_correct
        mlm_count += out.mlm_count
        nsp_correct += out.nsp_correct
    model.train(was_training)
    return {"mlm_loss": round(mlm_loss / max(mlm_count, 1), 5),
            "mlm_accuracy": round(mlm_correct / max(mlm_count, 1), 5),
            "nsp_accuracy": round(nsp_correct / max(count, 1), 5), "instances": count}
