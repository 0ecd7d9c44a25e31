"""Pretraining batches over the stored instances, the objectives' losses, and held-out scoring.

Reads ``data/pretrain/<split>/*.arrow`` shards and a pretrained folder's ``pretraining.json`` (which objective
made it); writes that file. Used by stages pretrain (training and its held-out curve) and evaluate (the
held-out figures of the saved model): MLM loss and accuracy where there is a masked LM (ELECTRA: the
generator's), NSP accuracy with NSP, replaced-token-detection accuracy and ROC-AUC with ELECTRA.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bertflow import training as tr
from bertflow.io import InputError, read_json, write_json
from bertflow.masking import MaskingSpec, mask_tokens
from bertflow.metrics import roc_auc
from bertflow.model import PretrainingOutput, masked_lm_loss, pretraining_loss

OBJECTIVE_FILE = "pretraining.json"  # in a pretrained folder: the objective that trained it


@dataclass(frozen=True)
class Objective:
    """``pretrain.objective``: which losses a step computes and which held-out figures mean something."""

    name: str = "mlm_nsp"
    rtd_weight: float = 50.0

    @property
    def nsp(self) -> bool:
        return self.name == "mlm_nsp"

    @property
    def electra(self) -> bool:
        return self.name == "electra"

    def loss(self, model, batch: dict[str, torch.Tensor], mlm_loss=masked_lm_loss,
             noise_seed: str = "") -> PretrainingOutput:
        """The objective's losses; ``noise_seed`` names the draw of ELECTRA's samples (run seed, step, ...)."""
        if self.electra:
            from bertflow import electra

            noise = electra.noise_generator(noise_seed, batch["input_ids"].device)
            return electra.electra_loss(model, batch, noise, self.rtd_weight, mlm_loss)
        return pretraining_loss(model, batch, mlm_loss, nsp=self.nsp)


def write_objective(folder: Path, objective: Objective, details: dict) -> None:
    write_json(folder / OBJECTIVE_FILE, {"objective": objective.name, **details})


def read_objective(folder: Path) -> Objective:
    """The objective a pretrained folder was trained with (a folder without the file: mlm_nsp, as before)."""
    path = folder / OBJECTIVE_FILE
    return Objective(read_json(path)["objective"]) if path.is_file() else Objective()


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

    def batch(self, indices: list[int], mask_seed: str, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Rows ``indices``; dynamic masks drawn per row from (``mask_seed``, row), so a row gets the same
        mask whichever process, batch slice or position it lands in. ``max_length``: each row cut to that many
        word pieces first (``shorten``; the short phase of ``pretrain.short_seq_fraction``)."""
        rows = self.table.take(indices).to_pylist()
        examples = [self._masked(row, random.Random(f"{mask_seed}/{i}"), max_length)
                    for i, row in zip(indices, rows, strict=True)]
        return collate(examples, self.pad_id)

    def _masked(self, row: dict, rng: random.Random,
                max_length: int | None = None) -> tuple[list[int], list[int], list[int], list[int], int]:
        ids, segments = row["input_ids"], row["token_type_ids"]
        positions, originals = row["masked_lm_positions"], row["masked_lm_ids"]
        if max_length is not None:  # before dynamic masking, so a short row still gets its share of masks
            ids, segments, positions, originals = shorten(ids, segments, positions, originals, max_length)
        if self.masking is not None:
            ids, positions, originals = mask_tokens(ids, self.masking, rng)
        return ids, segments, positions, originals, row["next_sentence_label"]


def shorten(ids: list[int], segments: list[int], positions: list[int], originals: list[int],
            length: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """An instance cut to ``length`` word pieces: each segment keeps its beginning (of a pair, the longer side
    gives way until both fit, each keeping at least half the room), [CLS] and the [SEP]s stay, and stored
    masks past the cut are dropped (the others move with their word pieces)."""
    if len(ids) <= length:
        return ids, segments, positions, originals
    first = [i for i in range(1, len(ids)) if segments[i] == 0][:-1]  # segment A without its [SEP]
    second = [i for i in range(len(ids)) if segments[i] == 1][:-1]  # segment B without its [SEP] (none: single)
    room = length - (3 if second else 2)
    b = min(len(second), max(room - len(first), room // 2))
    a = min(len(first), room - b)
    keep = [0, *first[:a], len(first) + 1] + ([*second[:b], len(ids) - 1] if second else [])
    moved = {old: new for new, old in enumerate(keep)}
    kept = [(moved[p], o) for p, o in zip(positions, originals, strict=True) if p in moved]
    return [ids[i] for i in keep], [segments[i] for i in keep], [p for p, _ in kept], [o for _, o in kept]


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
def evaluate_pretraining(model, batches: PretrainBatches, limit: int | None, batch_size: int, bf16: bool,
                         objective: Objective = Objective()) -> dict:
    """The held-out figures of ``objective`` on the first ``limit`` instances (computed on the model's device):
    MLM loss/accuracy (token-weighted), NSP accuracy with NSP, and with ELECTRA the replaced-token detection's
    loss, accuracy and ROC-AUC over every non-padding position (samples drawn from a fixed seed per batch)."""
    was_training = model.training
    model.eval()
    count = min(limit or len(batches), len(batches))
    sums = dict.fromkeys(("mlm_loss", "mlm_correct", "mlm_count", "nsp_correct", "rtd_loss", "rtd_correct",
                          "rtd_count"), 0.0)
    scores, labels = [], []
    for start in range(0, count, batch_size):
        batch = tr.to_device(batches.batch(list(range(start, min(start + batch_size, count))), mask_seed="eval"),
                             model.device)
        with tr.autocast(bf16, model.device):
            out = objective.loss(model, batch, noise_seed=f"eval/{start}")
        _add(sums, out)
        if out.rtd_scores is not None:
            scores.append(out.rtd_scores.cpu().numpy())
            labels.append(out.rtd_labels.cpu().numpy())
    model.train(was_training)
    return _heldout_figures(sums, count, objective, scores, labels)


def _add(sums: dict, out: PretrainingOutput) -> None:
    sums["mlm_loss"] += float(out.mlm_loss) * out.mlm_count
    sums["mlm_correct"] += out.mlm_correct
    sums["mlm_count"] += out.mlm_count
    sums["nsp_correct"] += out.nsp_correct
    if out.rtd_loss is not None:
        sums["rtd_loss"] += float(out.rtd_loss) * out.rtd_count
        sums["rtd_correct"] += out.rtd_correct
        sums["rtd_count"] += out.rtd_count


def _heldout_figures(sums: dict, count: int, objective: Objective, scores: list, labels: list) -> dict:
    figures = {"mlm_loss": round(sums["mlm_loss"] / max(sums["mlm_count"], 1), 5),
               "mlm_accuracy": round(sums["mlm_correct"] / max(sums["mlm_count"], 1), 5)}
    if objective.nsp:
        figures["nsp_accuracy"] = round(sums["nsp_correct"] / max(count, 1), 5)
    if objective.electra:
        positions = max(sums["rtd_count"], 1)
        truth = np.concatenate(labels) if labels else np.zeros(0, dtype=bool)
        auc = roc_auc(np.concatenate(scores), truth) if scores else None
        figures.update(rtd_loss=round(sums["rtd_loss"] / positions, 5),
                       rtd_accuracy=round(sums["rtd_correct"] / positions, 5),
                       rtd_auc=None if auc is None else round(auc, 5),
                       replaced_fraction=round(float(truth.mean()) if truth.size else 0.0, 5))
    return {**figures, "instances": count}
