"""Stage ingest: raw sources → cleaned, sentence-split corpus and checked labeled splits.

Reads: the sources in ``ingest.corpus.sources`` and the files in ``ingest.labeled``.
Writes: ``data/corpus/{train,heldout}.parquet`` + ``manifest.json`` (columns id, source, sentences),
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
    seen: set[str] = set()
    for source, text in raw:
        stats.read += 1
        text = clean_text(text)
        if len(text) < max(min_chars, 1):
            stats.dropped["too_short"] += 1
            continue
        doc_id = document_id(text)
        if doc_id in seen:
            stats.dropped["duplicate"] += 1
            continue
        seen.add(doc_id)
        sentences = document_sentences(text)
        if not sentences:
            stats.dropped["no_sentences"] += 1
            continue
        yield Document(doc_id, source, sentences)


def split_figures(documents: list[Document]) -> dict:
    sentences = [s for doc in documents for s in doc.sentences]
    return {
        "documents": len(documents),
        "sentences": len(sentences),
        "characters": sum(len(s) for s in sentences),
        "whitespace_tokens": sum(len(s.split()) for s in sentences),
    }


# ---------------------------------------------------------------- corpus: reading


def read_corpus(params: CorpusParams) -> tuple[list[Document], list[Document], dict]:
    """Read, clean and split every source; returns (train, heldout, manifest)."""
    reports = [SourceReport(source_name(source)) for source in params.sources]
    stats = CorpusStats()

    def raw() -> Iterator[tuple[str, str]]:
        for source, report in zip(params.sources, reports, strict=True):
            for text in read_source(source, params.on_decode_error, report):
                yield report.name, text

    documents = []
    for document in clean_documents(raw(), params.min_document_chars, stats):
        documents.append(document)
        if params.max_documents and len(documents) >= params.max_documents:
            break
    _check_corpus(params, documents, stats)
    heldout = [doc for doc in documents if is_heldout(doc.id, params.heldout_fraction)]
    train = [doc for doc in documents if not is_heldout(doc.id, params.heldout_fraction)]
    if not heldout or not train:
        raise InputError(f"corpus from {[s.path for s in params.sources]}: {len(documents)} documents give "
                         f"{len(train)} train and {len(heldout)} held-out with ingest.corpus.heldout_fraction="
                         f"{params.heldout_fraction}; both need at least one (add text or change the fraction)")
    manifest = {
        "sources": [vars(report) for report in reports],
        "documents_read": stats.read,
        "dropped": dict(stats.dropped),
        "train": split_figures(train),
        "heldout": split_figures(heldout),
    }
    return train, heldout, manifest


def _check_corpus(params: CorpusParams, documents: list[Document], stats: CorpusStats) -> None:
    if not documents:
        raise InputError(f"corpus {[s.path for s in params.sources]}: nothing left after cleaning "
                         f"({stats.read} documents read, dropped: {dict(stats.dropped) or 'none'}; "
                         f"ingest.corpus.min_document_chars={params.min_document_chars})")


def write_documents(path: Path, documents: list[Document]) -> None:
    table = pa.table({
        "id": [doc.id for doc in documents],
        "source": [doc.source for doc in documents],
        "sentences": pa.array([doc.sentences for doc in documents], type=pa.list_(pa.string())),
    })
    pq.write_table(table, path, compression="zstd")


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
        "fingerprints": {split: "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
                         for split, path in files.items() if path},
        "carved_from_train": carved_from_train,
        "rows": {split: len(rows[split]) for split in SPLITS},
        "label_counts": {split: dict(Counter(row.label for row in rows[split])) for split in SPLITS},
        "dropped": problems,
    }
    return rows, labels, manifest


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
    """Read every input, then write data/corpus and data/labeled atomically; returns the figures."""
    started = time.perf_counter()
    train, heldout, corpus_manifest = read_corpus(params.corpus)
    rows, labels, labeled_manifest = read_labeled(params.labeled)
    with atomic_dirs([paths.corpus, paths.labeled]) as (corpus_dir, labeled_dir):
        write_documents(corpus_dir / "train.parquet", train)
        write_documents(corpus_dir / "heldout.parquet", heldout)
        write_json(corpus_dir / "manifest.json", corpus_manifest)
        write_labeled(labeled_dir, rows, labels)
        write_json(labeled_dir / "manifest.json", labeled_manifest)
    return {
        "corpus": {key: corpus_manifest[key] for key in ("documents_read", "dropped", "train", "heldout")},
        "labeled": {"labels": labels, **{key: labeled_manifest[key] for key in ("rows", "dropped")}},
        "seconds": round(time.perf_counter() - started, 2),
    }
