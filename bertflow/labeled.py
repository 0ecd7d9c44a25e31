"""Reading and checking the labeled data set (TSV/CSV/JSONL) for ingest.

Reads the files named in ``ingest.labeled``; writes nothing. Returns rows with their file line
numbers so every problem can be reported as "count + first line numbers". Dev/test splits that are
not given are carved from train by a stable hash of the text, so identical texts never straddle
two splits and adding rows never moves existing ones.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from bertflow.io import InputError
from bertflow.params import LabeledParams
from bertflow.sources import iter_jsonl, read_text
from bertflow.text import clean_text

BAD_ROW_REASONS = ("empty_text", "missing_label", "unseen_label")
SHOWN_LINES = 10


@dataclass(frozen=True)
class Row:
    line: int
    text: str
    label: str


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("tsv", "csv", "jsonl"):
        raise InputError(f"{path}: cannot tell the format from the suffix; set ingest.labeled.format")
    return suffix


def read_rows(path: Path, params: LabeledParams) -> list[Row]:
    """All rows of one labeled file, texts cleaned; missing columns are an error naming the file."""
    text = read_text(path)
    fmt = detect_format(path, params.format)
    rows = _jsonl_rows(path, text, params) if fmt == "jsonl" else _delimited_rows(path, text, fmt, params)
    return rows[: params.max_rows] if params.max_rows else rows


def _delimited_rows(path: Path, text: str, fmt: str, params: LabeledParams) -> list[Row]:
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text))
    header = next(reader, None) if params.header else None
    text_at = _column_index(path, header, params.text_column, "text_column")
    label_at = _column_index(path, header, params.label_column, "label_column")
    rows = []
    for record in reader:
        if not record:
            continue
        rows.append(Row(reader.line_num, _cell(record, text_at), _cell(record, label_at)))
    return rows


def _column_index(path: Path, header: list[str] | None, column: str | int, key: str) -> int:
    if header is None:
        if not isinstance(column, int):
            raise InputError(f"{path}: ingest.labeled.{key} is {column!r} but the file has no header "
                             "(header: false); give a 0-based column index")
        return column
    if isinstance(column, int):
        return column
    if column not in header:
        raise InputError(f"{path}: no column '{column}' (ingest.labeled.{key}); the header has {header}")
    return header.index(column)


def _cell(record: list[str], index: int) -> str:
    return record[index].strip() if index < len(record) else ""


def _jsonl_rows(path: Path, text: str, params: LabeledParams) -> list[Row]:
    rows = []
    for number, record in iter_jsonl(path, text.split("\n")):
        if number == 1 and params.text_column not in record:
            raise InputError(f"{path}: no field '{params.text_column}' (ingest.labeled.text_column); "
                             f"the first record has {sorted(record)}")
        label = record.get(params.label_column)
        rows.append(Row(number, str(record.get(params.text_column) or ""), "" if label is None else str(label)))
    return rows


def clean_rows(rows: list[Row]) -> list[Row]:
    return [Row(row.line, clean_text(row.text).replace("\n", " "), row.label.strip()) for row in rows]


def find_bad_rows(rows: list[Row], known_labels: set[str] | None) -> dict[str, list[int]]:
    """Line numbers of rows with an empty text, a missing label, or (dev/test) a label unseen in train."""
    bad: dict[str, list[int]] = {reason: [] for reason in BAD_ROW_REASONS}
    for row in rows:
        if not row.text:
            bad["empty_text"].append(row.line)
        elif not row.label:
            bad["missing_label"].append(row.line)
        elif known_labels is not None and row.label not in known_labels:
            bad["unseen_label"].append(row.line)
    return {reason: lines for reason, lines in bad.items() if lines}


def describe_bad_rows(path: Path, bad: dict[str, list[int]]) -> str:
    parts = [f"{len(lines)} rows with {reason.replace('_', ' ')} (lines {', '.join(map(str, lines[:SHOWN_LINES]))}"
             f"{', ...' if len(lines) > SHOWN_LINES else ''})" for reason, lines in bad.items()]
    return f"{path}: " + "; ".join(parts)


def drop_lines(rows: list[Row], bad: dict[str, list[int]]) -> list[Row]:
    dropped = {line for lines in bad.values() for line in lines}
    return [row for row in rows if row.line not in dropped]


def hash_fraction(text: str) -> float:
    """A stable number in [0, 1) from the text: the same text always lands in the same split."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2**64


def carve(rows: list[Row], fraction: float, lower: float = 0.0) -> tuple[list[Row], list[Row]]:
    """Split rows into (kept, carved) where carved have a hash fraction in [lower, lower + fraction)."""
    kept, carved = [], []
    for row in rows:
        (carved if lower <= hash_fraction(row.text) < lower + fraction else kept).append(row)
    return kept, carved


def label_order(labels: set[str]) -> list[str]:
    """Labels sorted numerically when they are all integers, else alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)
