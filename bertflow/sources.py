"""Reading pretraining sources: local files/folders (.txt, .md, .jsonl, optionally .gz/.xz/.zst) and hf: ids.

Reads the files named in ``ingest.corpus.sources``; writes nothing. Yields raw documents (not yet
cleaned) and a fingerprint per source. Every failure is an ``InputError`` naming the file and,
where it applies, the line or byte offset.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bertflow.io import InputError
from bertflow.params import HF_PREFIX, CorpusSource

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
COMPRESSED_SUFFIXES = (".gz", ".xz", ".zst")
BINARY_SNIFF_BYTES = 8192


@dataclass
class SourceReport:
    """What reading one source found: its fingerprint and the files read or skipped."""

    name: str
    fingerprint: str = ""
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)


def list_files(root: Path) -> list[Path]:
    """The readable files of a source: the file itself, or every supported file below a folder."""
    if root.is_file():
        if _base_suffix(root) not in TEXT_SUFFIXES:
            raise InputError(f"{root}: unsupported file type; expected one of {_supported()}")
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and _base_suffix(p) in TEXT_SUFFIXES)
    if not files:
        raise InputError(f"{root}: no {_supported()} files in this folder")
    return files


def _supported() -> str:
    return ", ".join(TEXT_SUFFIXES) + " (optionally " + "/".join(COMPRESSED_SUFFIXES) + " compressed)"


def _base_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def read_bytes(path: Path) -> bytes:
    """File content, decompressed according to its suffix; a binary file is an error."""
    try:
        raw = path.read_bytes()
        data = _decompress(path, raw)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        offset = data.index(b"\x00")
        raise InputError(f"{path}: looks like a binary file (NUL byte at offset {offset}), not text")
    return data


def _decompress(path: Path, raw: bytes) -> bytes:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.decompress(raw)
    if suffix == ".xz":
        return lzma.decompress(raw)
    if suffix == ".zst":
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        except zstandard.ZstdError as exc:
            raise OSError(f"not valid zstd data: {exc}") from None
    return raw


def decode(path: Path, data: bytes, on_error: str) -> str | None:
    """UTF-8 text of ``data`` (BOM removed, CRLF → LF); None when the file is to be skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if on_error == "fail":
            raise InputError(
                f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason}); "
                "set ingest.corpus.on_decode_error to 'skip' or 'replace' to go on") from None
        if on_error == "skip":
            return None
        text = data.decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_documents(path: Path, text: str, source: CorpusSource) -> Iterator[str]:
    """Documents of one decoded file: jsonl records, blank-line blocks, or the whole file."""
    if _base_suffix(path) == ".jsonl":
        yield from _jsonl_texts(path, text, source.text_field)
    elif source.document_boundary == "file":
        yield text
    else:
        yield from split_blocks(text)


def split_blocks(text: str) -> Iterator[str]:
    """Blocks of non-blank lines: the documents of a blank-line-separated text."""
    block: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; bad JSON is an error naming the line."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None


def _jsonl_texts(path: Path, text: str, text_field: str) -> Iterator[str]:
    for number, record in iter_jsonl(path, text):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise InputError(f"{path}: line {number}: no string field '{text_field}' "
                             "(set text_field of this source)")
        yield record[text_field]


def read_local(source: CorpusSource, on_decode_error: str, report: SourceReport) -> Iterator[str]:
    """Raw documents of a local source; fills ``report`` with its fingerprint as a side value."""
    root = Path(source.path)
    digest = hashlib.sha256()
    for path in list_files(root):
        data = read_bytes(path)
        digest.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
        text = decode(path, data, on_decode_error)
        if text is None:
            report.skipped_files.append(str(path))
            continue
        report.files += 1
        yield from split_documents(path, text, source)
    report.fingerprint = "sha256:" + digest.hexdigest()


def read_hf(source: CorpusSource, report: SourceReport) -> Iterator[str]:
    """Raw documents of an ``hf:<dataset>[:<config>]`` source, loaded with ``datasets``."""
    name, _, config = source.path.removeprefix(HF_PREFIX).partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=source.split)
    except Exception as exc:  # datasets raises many types: offline, unknown id, bad config
        raise InputError(f"{source.path}: cannot load this dataset from the Hugging Face hub "
                         f"(is the hub reachable, or HF_HUB_OFFLINE set?): {type(exc).__name__}: {exc}") from None
    if source.text_field not in dataset.column_names:
        raise InputError(f"{source.path}: no column '{source.text_field}'; columns are {dataset.column_names}")
    report.fingerprint = f"hf:{dataset._fingerprint}"
    report.files = 1
    texts = dataset[source.text_field]
    if source.document_boundary == "file":  # one record, one document
        yield from texts
    else:  # records are lines (as in wikitext); blank records end documents
        yield from split_blocks("\n".join(texts))


def source_name(source: CorpusSource) -> str:
    """A machine-independent name for a source: the hf id, or the file/folder name."""
    return source.path if source.is_hf else Path(source.path).name


def read_source(source: CorpusSource, on_decode_error: str, report: SourceReport) -> Iterator[str]:
    if source.is_hf:
        return read_hf(source, report)
    return read_local(source, on_decode_error, report)
