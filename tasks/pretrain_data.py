"""Stage pretrain_data: NSP sentence pairs (or single segments) and MLM masks, with create_pretraining_data.py's
semantics.

Reads: ``data/corpus/{train,heldout}.parquet`` and ``artifacts/tokenizer``.
Writes: ``data/pretrain/{train,heldout}/shard-*.arrow`` (Arrow IPC streams, loadable with
``datasets.Dataset.from_file``), ``data/pretrain/info.json`` and ``reports/pretrain_data.json``.
Run: ``bertflow pretrain_data``.

Each instance is ``[CLS] A [SEP] B [SEP]`` with segment ids; B is A's true continuation half of
the time, otherwise text from a different document (``next_sentence_label`` 0 = continuation,
1 = random, as in transformers). With ``next_sentence: false`` each instance is ``[CLS] text [SEP]``: a
document's contiguous sentences packed up to ``max_seq_length`` (segment 0, ``next_sentence_label`` 0 and
meaningless), for the objectives without NSP (``pretrain.objective: mlm | electra``). ``mask_tokens`` is the
one masking function: this stage uses it for static masks (train with ``masking: static``, held-out always)
and the training collator for dynamic ones. Work is cut into units of about ``shard_tokens`` source tokens
per dupe, each with its own seed derived from ``random_seed``, so the output does not depend on ``num_proc``.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from bertflow.io import InputError, atomic_dirs, read_column, write_json
from bertflow.masking import MaskingSpec, mask_tokens, masking_spec
from bertflow.pairs import Instance, PairSpec, create_instances_from_document, create_segments_from_document
from bertflow.params import PretrainDataParams
from bertflow.paths import Paths
from bertflow.tokenization import Document, load_tokenizer, tokenize_documents

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("token_type_ids", pa.list_(pa.int8())),
    ("next_sentence_label", pa.int8()),
    ("masked_lm_positions", pa.list_(pa.int16())),
    ("masked_lm_ids", pa.list_(pa.int32())),
])
# ---------------------------------------------------------------- masking (shared with training)


# ---------------------------------------------------------------- NSP pairs


# ---------------------------------------------------------------- work units


@dataclass(frozen=True)
class Unit:
    split: str
    dupe: int
    chunk: int
    start: int  # document range [start, stop)
    stop: int
    static: bool

    @property
    def name(self) -> str:
        return f"shard-{self.dupe:03d}-{self.chunk:05d}.arrow"


def plan_units(documents: Sequence[Document], split: str, dupe_factor: int, shard_tokens: int,
               static: bool) -> list[Unit]:
    """Cut the documents into ranges of about ``shard_tokens`` tokens, once per dupe."""
    ranges, start, tokens = [], 0, 0
    for i, document in enumerate(documents):
        tokens += sum(len(s) for s in document)
        if tokens >= shard_tokens:
            ranges.append((start, i + 1))
            start, tokens = i + 1, 0
    if start < len(documents):
        ranges.append((start, len(documents)))
    return [Unit(split, dupe, chunk, a, b, static)
            for dupe in range(dupe_factor) for chunk, (a, b) in enumerate(ranges)]


def build_unit(unit: Unit, documents: Sequence[Document], pairs: PairSpec, masking: MaskingSpec,
               seed: int, next_sentence: bool = True) -> tuple[pa.Table, Counter]:
    """All instances of one unit (pairs, or single segments), shuffled, masked; returns the table and its counts."""
    rng = random.Random(f"{seed}/{unit.split}/{unit.dupe}/{unit.chunk}")
    if next_sentence:
        instances = [inst for index in range(unit.start, unit.stop)
                     for inst in create_instances_from_document(documents, index, pairs, rng)]
    else:
        instances = [inst for index in range(unit.start, unit.stop)
                     for inst in create_segments_from_document(documents[index], pairs, rng)]
    rng.shuffle(instances)
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    counts: Counter = Counter()
    for inst in instances:
        masked, positions, labels = mask_tokens(inst.input_ids, masking, rng)
        _count(counts, inst, masked, positions, labels, masking)
        columns["input_ids"].append(masked if unit.static else inst.input_ids)
        columns["token_type_ids"].append(inst.token_type_ids)
        columns["next_sentence_label"].append(int(inst.is_random_next))
        columns["masked_lm_positions"].append(positions if unit.static else [])
        columns["masked_lm_ids"].append(labels if unit.static else [])
    return pa.table(columns, schema=SCHEMA), counts


def _count(counts: Counter, inst: Instance, masked: list[int], positions: list[int], labels: list[int],
           masking: MaskingSpec) -> None:
    counts["instances"] += 1
    counts["tokens"] += len(inst.input_ids)
    counts["random_next"] += inst.is_random_next
    counts["maskable"] += sum(1 for t in inst.input_ids if t not in masking.special_ids)
    counts["masked"] += len(positions)
    counts["masked_special"] += sum(1 for t in labels if t in masking.special_ids)
    for position, original in zip(positions, labels, strict=True):
        kind = "as_mask" if masked[position] == masking.mask_token_id else (
            "as_self" if masked[position] == original else "as_random")
        counts[kind] += 1
    counts["longest"] = max(counts["longest"], len(inst.input_ids))


def write_table(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


# Set in the parent before the pool forks, so workers share the token lists without pickling.
_WORK: dict = {}


def _run_unit(unit: Unit) -> tuple[str, Counter]:
    documents = _WORK["documents"][unit.split]
    table, counts = build_unit(unit, documents, _WORK["pairs"], _WORK["masking"], _WORK["seed"],
                               _WORK["next_sentence"])
    write_table(_WORK["out"] / unit.split / unit.name, table)
    return f"{unit.split}/{unit.name}", counts


def run_units(units: list[Unit], num_proc: int) -> list[tuple[str, Counter]]:
    if num_proc == 1 or len(units) == 1:
        return [_run_unit(unit) for unit in units]
    with multiprocessing.get_context("fork").Pool(min(num_proc, len(units))) as pool:
        return pool.map(_run_unit, units, chunksize=1)


# ---------------------------------------------------------------- tokenizing and figures


def merge_counts(parts: list[Counter]) -> Counter:
    """Sum per-shard counts; ``longest`` is a maximum, not a sum."""
    total = sum(parts, Counter())
    total["longest"] = max((part["longest"] for part in parts), default=0)
    return total


def summarize(counts: Counter, max_seq_length: int, next_sentence: bool = True) -> dict:
    masked = max(counts["masked"], 1)
    return {
        "instances": counts["instances"],
        "tokens": counts["tokens"],
        "nsp_positive_rate": round(1 - counts["random_next"] / max(counts["instances"], 1), 4) if next_sentence
        else None,
        "masked_rate": round(counts["masked"] / max(counts["maskable"], 1), 4),
        "masked_split": {kind: round(counts[f"as_{kind}"] / masked, 4) for kind in ("mask", "random", "self")},
        "masked_special_tokens": counts["masked_special"],
        "longest_instance": counts["longest"],
        "padding_fraction": round(1 - counts["tokens"] / max(counts["instances"] * max_seq_length, 1), 4),
    }


def group_rows(texts: list[str], rows_per_document: int, repeat: int, seed: int) -> list[list[str]]:
    """Pseudo-documents of labeled texts for in-domain MLM (their NSP pairs are noise).

    The first copy keeps the file order; each further copy is shuffled (seeded) before grouping,
    so repeated texts meet different neighbours.
    """
    documents = []
    for copy in range(repeat):
        rows = list(texts)
        if copy:
            random.Random(f"{seed}/labeled/{copy}").shuffle(rows)
        documents += [rows[i:i + rows_per_document] for i in range(0, len(rows), rows_per_document)]
    return documents


def read_texts(paths: Paths, params: PretrainDataParams) -> dict[str, list[list[str]]]:
    """Sentences per document: the corpus splits, plus the labeled training texts when asked (train only)."""
    texts = {split: read_column(paths.corpus / f"{split}.parquet", "sentences") for split in ("train", "heldout")}
    if params.include_labeled_train:
        labeled = read_column(paths.labeled / "train.parquet", "text")
        texts["train"] = texts["train"] + group_rows(labeled, params.labeled_rows_per_document,
                                                     params.labeled_repeat, params.random_seed)
    return texts


# ---------------------------------------------------------------- edge


def run(params: PretrainDataParams, paths: Paths) -> dict:
    started = time.perf_counter()
    tokenizer = load_tokenizer(paths.tokenizer)
    texts = read_texts(paths, params)
    source_bytes = sum(len(s.encode("utf-8")) for docs in texts.values() for doc in docs for s in doc)
    documents = {split: tokenize_documents(tokenizer, docs) for split, docs in texts.items()}
    for split, docs in documents.items():
        if len(docs) < 2 and params.next_sentence:
            raise InputError(f"{paths.corpus / split}.parquet: {len(docs)} non-empty documents; "
                             "next-sentence pairs need at least 2")
    tokenize_seconds = time.perf_counter() - started
    units = (plan_units(documents["train"], "train", params.dupe_factor, params.shard_tokens,
                        params.masking == "static")
             + plan_units(documents["heldout"], "heldout", 1, params.shard_tokens, static=True))
    with atomic_dirs([paths.pretrain_data]) as (out,):
        for split in documents:
            (out / split).mkdir()
        _WORK.update(documents=documents, out=out, seed=params.random_seed, masking=masking_spec(tokenizer, params),
                     next_sentence=params.next_sentence,
                     pairs=PairSpec(tokenizer.cls_token_id, tokenizer.sep_token_id, params.max_seq_length,
                                    params.short_seq_prob))
        try:
            results = run_units(units, params.num_proc)
        finally:
            _WORK.clear()
        figures = _figures(results, params, source_bytes, tokenize_seconds, started)
        write_json(out / "info.json", {"params": params.model_dump(), "vocab_size": len(tokenizer),
                                       "schema": SCHEMA.names, "shards": {name: c["instances"] for name, c in results},
                                       "figures": figures})
    return figures


def _figures(results, params: PretrainDataParams, source_bytes: int, tokenize_seconds: float,
             started: float) -> dict:
    by_split = {split: merge_counts([c for name, c in results if name.startswith(split + "/")])
                for split in ("train", "heldout")}
    seconds = time.perf_counter() - started
    return {
        "masking": params.masking,
        "segments": "pairs" if params.next_sentence else "single",
        "random_seed": params.random_seed,
        "train": summarize(by_split["train"], params.max_seq_length, params.next_sentence),
        "heldout": summarize(by_split["heldout"], params.max_seq_length, params.next_sentence),
        "shards": len(results),
        "source_mb": round(source_bytes / 1e6, 2),
        "tokenize_seconds": round(tokenize_seconds, 2),
        "seconds": round(seconds, 2),
        "mb_per_second": round(source_bytes / 1e6 / seconds, 3),
    }
