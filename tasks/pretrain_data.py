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
and the training collator for dynamic ones.

Streaming: the Parquet splits are read in record batches and cut, as they are read, into units of whole
documents of about ``shard_tokens`` source tokens (estimated from UTF-8 bytes, ``BYTES_PER_TOKEN``). Each unit
goes to a worker that tokenizes it and builds and writes its shards, one per dupe, each with its own seed
derived from ``random_seed``, so the output does not depend on ``num_proc``. A random next segment is drawn
from another document of the same unit: as in google-research/bert, where ``create_pretraining_data.py`` runs
on each input shard on its own, no step needs the whole corpus. Peak memory is bounded by the setting, not
the corpus: at most ``num_proc + 1`` units are out at the workers, and the parent holds two more being cut;
each worker holds one unit's text and token ids and one dupe's instances. A unit is whole documents, so it
may exceed ``shard_tokens`` by one document; the reader holds one row group of the Parquet file at a time
(as Arrow data: its size is the writer's choice); the labeled training texts (``include_labeled_train``) are
read whole, as they are the task's data set and not the corpus.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from bertflow.io import InputError, atomic_dirs, iter_column, read_column, write_json
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


# ---------------------------------------------------------------- work units

# UTF-8 bytes of text per word piece, to cut units before they are tokenized: about 4.3 for English WordPiece
# at a 16k vocabulary, 3 for Chinese (one piece per character), so a unit holds about shard_tokens pieces.
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class Unit:
    """Consecutive whole documents of one split (text, tokenized by the worker), built ``dupes`` times."""

    split: str
    chunk: int
    documents: list[list[str]]
    dupes: int
    static: bool

    def name(self, dupe: int) -> str:
        return f"shard-{dupe:03d}-{self.chunk:05d}.arrow"


def document_bytes(document: list[str]) -> int:
    return sum(len(sentence.encode("utf-8")) for sentence in document)


def cut_units(documents: Iterable[list[str]], unit_bytes: int, min_documents: int = 2) -> Iterator[list[list[str]]]:
    """Consecutive runs of whole documents of about ``unit_bytes`` UTF-8 bytes, each of at least ``min_documents``
    documents (a short tail joins the run before it). Holds at most two runs at a time.

    >>> [len(run) for run in cut_units([["abc"], ["de"], ["fgh"], ["ij"], ["k"]], unit_bytes=5)]
    [2, 3]
    """
    pending, run, size = None, [], 0
    for document in documents:
        run.append(document)
        size += document_bytes(document)
        if size >= unit_bytes and len(run) >= min_documents:
            if pending is not None:
                yield pending
            pending, run, size = run, [], 0
    if pending is not None and 0 < len(run) < min_documents:
        pending, run = pending + run, []
    yield from (r for r in (pending, run) if r)


def plan_units(documents: Iterable[list[str]], split: str, dupes: int, shard_tokens: int,
               static: bool) -> Iterator[Unit]:
    """The split's documents cut into units of about ``shard_tokens`` source tokens, as they are read."""
    runs = cut_units(documents, shard_tokens * BYTES_PER_TOKEN)
    return (Unit(split, chunk, run, dupes, static) for chunk, run in enumerate(runs))


def build_unit(unit: Unit, dupe: int, documents: Sequence[Document], pairs: PairSpec, masking: MaskingSpec,
               seed: int, next_sentence: bool = True) -> tuple[pa.Table, Counter]:
    """One dupe of a unit's instances (pairs, or single segments), shuffled, masked; returns the table and its counts.

    ``documents`` are the unit's own, tokenized: a random next segment comes from another document of the same
    unit, as create_pretraining_data.py draws it from the same input file (each of its shards is processed on
    its own), so no worker needs the whole split.
    """
    rng = random.Random(f"{seed}/{unit.split}/{dupe}/{unit.chunk}")
    if next_sentence:
        instances = [inst for index in range(len(documents))
                     for inst in create_instances_from_document(documents, index, pairs, rng)]
    else:
        instances = [inst for document in documents for inst in create_segments_from_document(document, pairs, rng)]
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


# Set in the parent before the pool forks, so workers share the tokenizer and settings without pickling.
_WORK: dict = {}


@dataclass
class UnitResult:
    split: str
    shards: list[tuple[str, Counter]]  # ("train/shard-…", counts) per dupe
    source: Counter  # documents, source_bytes, source_tokens, tokenize_seconds


def run_unit(unit: Unit) -> UnitResult:
    """Tokenize one unit, then build and write each of its dupes (one shard each); runs in a worker."""
    started = time.perf_counter()
    documents = tokenize_documents(_WORK["tokenizer"], unit.documents)
    source = Counter(documents=len(documents), source_bytes=sum(map(document_bytes, unit.documents)),
                     source_tokens=sum(len(s) for d in documents for s in d),
                     tokenize_seconds=time.perf_counter() - started)
    if _WORK["next_sentence"] and len(documents) < 2:
        raise InputError(f"{_WORK['sources'][unit.split]}: {len(documents)} non-empty documents in the {unit.split} "
                         f"split (unit {unit.chunk}); next-sentence pairs need at least 2")
    shards = []
    for dupe in range(unit.dupes):
        table, counts = build_unit(unit, dupe, documents, _WORK["pairs"], _WORK["masking"], _WORK["seed"],
                                   _WORK["next_sentence"])
        write_table(_WORK["out"] / unit.split / unit.name(dupe), table)
        shards.append((f"{unit.split}/{unit.name(dupe)}", counts))
    return UnitResult(unit.split, shards, source)


def run_units(units: Iterable, num_proc: int, work: Callable = run_unit) -> Iterator:
    """``work(unit)`` for each unit, results in the units' order, over ``num_proc`` forked workers.

    The units are drawn from the iterable only as results come back: at most ``num_proc + 1`` are handed out and
    not yet collected, so a generator of units is read as fast as the workers build, never ahead of them.
    """
    if num_proc == 1:
        yield from map(work, units)
        return
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        pending: deque = deque()
        for unit in units:
            pending.append(pool.apply_async(work, (unit,)))
            if len(pending) > num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- figures and reading


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


def group_rows(texts: list[str], rows_per_document: int, repeat: int, seed: int) -> Iterator[list[str]]:
    """Pseudo-documents of labeled texts for in-domain MLM (their NSP pairs are noise), one copy at a time.

    The first copy keeps the file order; each further copy is shuffled (seeded) before grouping,
    so repeated texts meet different neighbours.
    """
    for copy in range(repeat):
        rows = list(texts)
        if copy:
            random.Random(f"{seed}/labeled/{copy}").shuffle(rows)
        yield from (rows[i:i + rows_per_document] for i in range(0, len(rows), rows_per_document))


def read_documents(paths: Paths, params: PretrainDataParams) -> dict[str, Iterator[list[str]]]:
    """Sentences per document, streamed from the corpus splits, then the labeled training texts when asked (train
    only; the labeled set is read whole: it is the task's data, not the corpus)."""
    documents = {split: iter_column(paths.corpus / f"{split}.parquet", "sentences") for split in ("train", "heldout")}
    if params.include_labeled_train:
        labeled = read_column(paths.labeled / "train.parquet", "text")
        documents["train"] = itertools.chain(documents["train"], group_rows(
            labeled, params.labeled_rows_per_document, params.labeled_repeat, params.random_seed))
    return documents


# ---------------------------------------------------------------- edge


def run(params: PretrainDataParams, paths: Paths) -> dict:
    """Stream the corpus through the workers unit by unit; peak memory follows ``shard_tokens`` × (num_proc + 1)."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(paths.tokenizer)
    documents = read_documents(paths, params)
    units = itertools.chain(
        plan_units(documents["train"], "train", params.dupe_factor, params.shard_tokens, params.masking == "static"),
        plan_units(documents["heldout"], "heldout", 1, params.shard_tokens, static=True))
    with atomic_dirs([paths.pretrain_data]) as (out,):
        for split in documents:
            (out / split).mkdir()
        _WORK.update(tokenizer=tokenizer, out=out, seed=params.random_seed, masking=masking_spec(tokenizer, params),
                     next_sentence=params.next_sentence,
                     sources={split: paths.corpus / f"{split}.parquet" for split in documents},
                     pairs=PairSpec(tokenizer.cls_token_id, tokenizer.sep_token_id, params.max_seq_length,
                                    params.short_seq_prob))
        try:
            results = list(run_units(units, params.num_proc))
        finally:
            _WORK.clear()
        figures = _figures(results, params, started)
        shards = {name: counts["instances"] for result in results for name, counts in result.shards}
        write_json(out / "info.json", {"params": params.model_dump(), "vocab_size": len(tokenizer),
                                       "schema": SCHEMA.names, "shards": shards, "figures": figures})
    return figures


def _figures(results: list[UnitResult], params: PretrainDataParams, started: float) -> dict:
    by_split = {split: merge_counts([c for r in results if r.split == split for _, c in r.shards])
                for split in ("train", "heldout")}
    source = sum((r.source for r in results), Counter())
    seconds = time.perf_counter() - started
    return {
        "masking": params.masking,
        "segments": "pairs" if params.next_sentence else "single",
        "random_seed": params.random_seed,
        "train": summarize(by_split["train"], params.max_seq_length, params.next_sentence),
        "heldout": summarize(by_split["heldout"], params.max_seq_length, params.next_sentence),
        "shards": sum(len(r.shards) for r in results),
        "units": {split: sum(r.split == split for r in results) for split in ("train", "heldout")},
        "largest_unit_tokens": max((r.source["source_tokens"] for r in results), default=0),
        "documents": source["documents"],
        "source_tokens": source["source_tokens"],
        "source_mb": round(source["source_bytes"] / 1e6, 2),
        "tokenize_seconds": round(source["tokenize_seconds"], 2),  # summed over the workers
        "seconds": round(seconds, 2),
        "mb_per_second": round(source["source_bytes"] / 1e6 / seconds, 3),
    }
