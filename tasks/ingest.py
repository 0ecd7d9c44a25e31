"""Stage ingest: raw sources → cleaned, sentence-split corpus and checked labeled splits.

Reads: the sources in ``ingest.corpus.sources`` and the files in ``ingest.labeled``.
Writes: ``data/corpus/{train,heldout}.parquet`` + ``manifest.json`` (columns id, source, sentences; written as
the sources stream in, ``ingest.corpus.batch_documents`` documents per row group),
``data/labeled/{train,dev,test}.parquet`` (text, label, label_id) + ``labels.json`` + ``manifest.json``,
and ``reports/ingest.json``. Run: ``bertflow ingest`` (what dvc.yaml calls).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bertflow import labeled as lab
from bertflow.io import InputError, atomic_dirs, write_json
from bertflow.params import CorpusParams, IngestParams, LabeledParams
from bertflow.paths import Paths
from bertflow.sources import SourceReport, read_source, source_name
from bertflow.text import clean_text, document_sentences

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


# ---------------------------------------------------------------- corpus: pure functions


@dataclass
class Document:
    id: str
    source: str
    sentences: list[str]


@dataclass
class CorpusStats:
    read: int = 0
    dropped: Counter = field(default_factory=Counter)


def document_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Stable split by the document's own hash: adding documents never moves existing ones."""
    return int(doc_id[:16], 16) / 2**64 < fraction


def clean_documents(raw: Iterable[tuple[str, str]], min_chars: int, stats: CorpusStats) -> Iterator[Document]:
    """Clean (source, text) pairs into documents; drop short, duplicate and sentence-less ones."""
    seen: set[int] = set()  # the first 8 bytes of each document's hash: small, and collisions ~n²/2⁶⁵
    for source, text in raw:
        stats.read += 1
        text = clean_text(text)
        if len(text) < max(min_chars, 1):
            stats.dropped["too_short"] += 1
            continue
        doc_id = document_id(text)
        key = int(doc_id[:16], 16)
        if key in seen:
            stats.dropped["duplicate"] += 1
            continue
        seen.add(key)
        sentences = document_sentences(text)
        if not sentences:
            stats.dropped["no_sentences"] += 1
            continue
        yield Document(doc_id, source, sentences)


class SplitWriter:
    """One corpus split as a parquet file written as it streams in: ``batch`` documents at a time (one row
    group), with its figures counted on the way."""

    SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("sentences", pa.list_(pa.string()))])

    def __init__(self, path: Path, batch: int):
        self.writer = pq.ParquetWriter(path, self.SCHEMA, compression="zstd")
        self.batch, self.pending = batch, []
        self.figures = {"documents": 0, "sentences": 0, "characters": 0, "whitespace_tokens": 0}

    def add(self, document: Document) -> None:
        self.pending.append(document)
        self.figures["documents"] += 1
        self.figures["sentences"] += len(document.sentences)
        self.figures["characters"] += sum(len(s) for s in document.sentences)
        self.figures["whitespace_tokens"] += sum(len(s.split()) for s in document.sentences)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.table({
                "id": [doc.id for doc in self.pending],
                "source": [doc.source for doc in self.pending],
                "sentences": pa.array([doc.sentences for doc in self.pending], type=pa.list_(pa.string())),
            }, schema=self.SCHEMA))
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


# ---------------------------------------------------------------- corpus: streaming it through


def write_corpus(params: CorpusParams, folder: Path) -> dict:
    """Read, clean and split every source into ``folder/{train,heldout}.parquet`` as it streams; returns the
    manifest. Memory: ``batch_documents`` documents per split, one source document, and the set of document
    hashes seen (for duplicates: 8 bytes and a set slot per document)."""
    reports = [SourceReport(source_name(source)) for source in params.sources]
    stats = CorpusStats()

    def raw() -> Iterator[tuple[str, str]]:
        for source, report in zip(params.sources, reports, strict=True):
            for text in read_source(source, params.on_decode_error, report):
                yield report.name, text

    splits = {split: SplitWriter(folder / f"{split}.parquet", params.batch_documents) for split in ("train", "heldout")}
    try:
        for count, document in enumerate(clean_documents(raw(), params.min_document_chars, stats), start=1):
            splits["heldout" if is_heldout(document.id, params.heldout_fraction) else "train"].add(document)
            if params.max_documents and count >= params.max_documents:
                break
    finally:
        for writer in splits.values():
            writer.close()
    figures = {split: writer.figures for split, writer in splits.items()}
    _check_corpus(params, figures, stats)
    return {"sources": [vars(report) for report in reports], "documents_read": stats.read,
            "dropped": dict(stats.dropped), **figures}


def _check_corpus(params: CorpusParams, figures: dict, stats: CorpusStats) -> None:
    train, heldout = figures["train"]["documents"], figures["heldout"]["documents"]
    if not train + heldout:
        raise InputError(f"corpus {[s.path for s in params.sources]}: nothing left after cleaning "
                         f"({stats.read} documents read, dropped: {dict(stats.dropped) or 'none'}; "
                         f"ingest.corpus.min_document_chars={params.min_document_chars})")
    if not heldout or not train:
        raise InputError(f"corpus from {[s.path for s in params.sources]}: {train + heldout} documents give "
                         f"{train} train and {heldout} held-out with ingest.corpus.heldout_fraction="
                         f"{params.heldout_fraction}; both need at least one (add text or change the fraction)")


# ---------------------------------------------------------------- labeled data


def read_labeled(params: LabeledParams) -> tuple[dict[str, list[lab.Row]], list[str], dict]:
    """Read train/dev/test (carving absent ones from train), check rows; returns (splits, labels, manifest)."""
    files = {split: getattr(params, split) for split in SPLITS}
    rows = {split: lab.clean_rows(lab.read_rows(Path(path), params)) for split, path in files.items() if path}
    carved_from_train = _carve_missing(rows, params)
    problems = {}
    rows["train"], problems["train"] = _checked(Path(files["train"]), rows["train"], None, params)
    labels = lab.label_order({row.label for row in rows["train"]})
    if not labels:
        raise InputError(f"{files['train']}: no usable labeled rows")
    for split in ("dev", "test"):
        path = Path(files[split] or files["train"])
        rows[split], problems[split] = _checked(path, rows[split], set(labels), params)
    manifest = {
        "files": {split: Path(path).name if path else None for split, path in files.items()},
        "fingerprints": {split: "sha256:" + fingerprint(Path(path))
                         for split, path in files.items() if path},
        "carved_from_train": carved_from_train,
        "rows": {split: len(rows[split]) for split in SPLITS},
        "label_counts": {split: dict(Counter(row.label for row in rows[split])) for split in SPLITS},
        "dropped": problems,
    }
    return rows, labels, manifest


def fingerprint(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _carve_missing(rows: dict[str, list[lab.Row]], params: LabeledParams) -> list[str]:
    carved = []
    if "dev" not in rows:
        rows["train"], rows["dev"] = lab.carve(rows["train"], params.dev_fraction)
        carved.append("dev")
    if "test" not in rows:  # a hash range disjoint from dev's, so one text never lands in both
        rows["train"], rows["test"] = lab.carve(rows["train"], params.test_fraction, lower=params.dev_fraction)
        carved.append("test")
    return carved


def _checked(path: Path, rows: list[lab.Row], known: set[str] | None,
             params: LabeledParams) -> tuple[list[lab.Row], dict]:
    bad = lab.find_bad_rows(rows, known)
    if not bad:
        return rows, {}
    message = lab.describe_bad_rows(path, bad)
    if params.on_bad_row == "fail":
        raise InputError(message + " (ingest.labeled.on_bad_row: fail)")
    log.warning("dropped %s", message)
    return lab.drop_lines(rows, bad), {reason: {"count": len(lines), "first_lines": lines[: lab.SHOWN_LINES]}
                                        for reason, lines in bad.items()}


def write_labeled(folder: Path, rows: dict[str, list[lab.Row]], labels: list[str]) -> None:
    label2id = {label: i for i, label in enumerate(labels)}
    for split, split_rows in rows.items():
        table = pa.table({
            "text": [row.text for row in split_rows],
            "label": [row.label for row in split_rows],
            "label_id": pa.array([label2id[row.label] for row in split_rows], type=pa.int32()),
        })
        pq.write_table(table, folder / f"{split}.parquet", compression="zstd")
    write_json(folder / "labels.json", {"labels": labels, "label2id": label2id,
                                        "id2label": {str(i): label for label, i in label2id.items()}})


# ---------------------------------------------------------------- edge


def run(params: IngestParams, paths: Paths) -> dict:
    """Check the labeled files, then stream the corpus into data/corpus and write data/labeled, both replaced
    atomically (bad input anywhere leaves the previous outputs as they were); returns the figures."""
    started = time.perf_counter()
    rows, labels, labeled_manifest = read_labeled(params.labeled)
    with atomic_dirs([paths.corpus, paths.labeled]) as (corpus_dir, labeled_dir):
        corpus_manifest = write_corpus(params.corpus, corpus_dir)
        write_json(corpus_dir / "manifest.json", corpus_manifest)
        write_labeled(labeled_dir, rows, labels)
        write_json(labeled_dir / "manifest.json", labeled_manifest)
    return {
        "corpus": {key: corpus_manifest[key] for key in ("documents_read", "dropped", "train", "heldout")},
        "labeled": {"labels": labels, **{key: labeled_manifest[key] for key in ("rows", "dropped")}},
        "seconds": round(time.perf_counter() - started, 2),
    }
