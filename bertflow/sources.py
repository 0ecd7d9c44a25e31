"""Reading pretraining sources: local files/folders (.txt, .md, .jsonl, optionally .gz/.xz/.zst) and hf: ids.

Reads the files named in ``ingest.corpus.sources``; writes nothing. Yields raw documents (not yet
cleaned) and a fingerprint per source. Everything streams: a file is read line by line through its
decompressor, so memory holds one document (one block of lines, one jsonl record, or, with
``document_boundary: file``, one file), never a whole source. Every failure is an ``InputError`` naming the file and,
where it applies, the line or byte offset.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import lzma
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bertflow.io import InputError
from bertflow.params import HF_PREFIX, CorpusSource

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
COMPRESSED_SUFFIXES = (".gz", ".xz", ".zst")
BINARY_SNIFF_BYTES = 8192
HF_BATCH = 1000  # records of an hf: dataset read at a time


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


def open_stream(path: Path) -> BinaryIO:
    """The file's content as a binary stream, decompressed according to its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True,
                                                                            read_across_frames=True))
    return open(path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError


def sniff_binary(path: Path) -> None:
    """A NUL byte among the first bytes means a binary file: an error naming the offset."""
    try:
        with open_stream(path) as stream:
            head = stream.read(BINARY_SNIFF_BYTES)
    except _read_errors() as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    nul = head.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{path}: looks like a binary file (NUL byte at offset {nul}), not text")


def raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line with its newline) of the decompressed content, one line in memory at a time."""
    offset = 0
    try:
        with open_stream(path) as stream:
            for line in stream:
                yield offset, line
                offset += len(line)
    except _read_errors() as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None


class UndecodableFile(Exception):
    """A line that is not UTF-8 in a file read with ``on_decode_error: skip``."""


def decode_line(path: Path, offset: int, raw: bytes, on_error: str) -> str:
    """One line as text; invalid UTF-8 fails naming the byte offset, skips the file, or is replaced."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if on_error == "fail":
            raise InputError(
                f"{path}: not valid UTF-8 at byte offset {offset + exc.start} ({exc.reason}); "
                "set ingest.corpus.on_decode_error to 'skip' or 'replace' to go on") from None
        if on_error == "skip":
            raise UndecodableFile(str(path)) from None
        return raw.decode("utf-8", errors="replace")


def text_lines(path: Path, on_error: str, digest=None) -> Iterator[str]:
    """The file's lines as text (BOM removed; CRLF and CR end lines as LF does), streamed. ``digest`` (a
    hashlib object) is fed every decompressed byte on the way."""
    for offset, raw in raw_lines(path):
        if digest is not None:
            digest.update(raw)
        if offset == 0 and raw.startswith(codecs.BOM_UTF8):
            raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
        line = decode_line(path, offset, raw, on_error).removesuffix("\n").removesuffix("\r")
        yield from line.split("\r")


def read_text(path: Path) -> str:
    """A whole (small) file as text, lines joined by LF: for labeled files, which are read into memory."""
    sniff_binary(path)
    return "\n".join(text_lines(path, "fail"))


def decodable(path: Path) -> bool:
    """Whether every line of the file is UTF-8 (a first pass, for ``on_decode_error: skip``)."""
    try:
        for _ in text_lines(path, "skip"):
            pass
    except UndecodableFile:
        return False
    return True


def split_documents(path: Path, lines: Iterable[str], source: CorpusSource) -> Iterator[str]:
    """Documents of one file's lines: jsonl records, blank-line blocks, or the whole file."""
    if _base_suffix(path) == ".jsonl":
        yield from _jsonl_texts(path, lines, source.text_field)
    elif source.document_boundary == "file":
        yield "\n".join(lines)
    else:
        yield from split_blocks(lines)


def split_blocks(lines: Iterable[str]) -> Iterator[str]:
    """Blocks of non-blank lines: the documents of a blank-line-separated text, one block in memory."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def iter_jsonl(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; bad JSON is an error naming the line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None


def _jsonl_texts(path: Path, lines: Iterable[str], text_field: str) -> Iterator[str]:
    for number, record in iter_jsonl(path, lines):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise InputError(f"{path}: line {number}: no string field '{text_field}' "
                             "(set text_field of this source)")
        yield record[text_field]


def read_local(source: CorpusSource, on_decode_error: str, report: SourceReport) -> Iterator[str]:
    """Raw documents of a local source, streamed file by file and line by line; fills ``report`` with its
    fingerprint (sha256 over each file's relative name and the sha256 of its decompressed bytes)."""
    root = Path(source.path)
    digest = hashlib.sha256()
    for path in list_files(root):
        sniff_binary(path)
        file_digest = hashlib.sha256()
        digest.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
        if on_decode_error == "skip" and not decodable(path):
            report.skipped_files.append(str(path))
            for _, raw in raw_lines(path):
                file_digest.update(raw)
        else:
            report.files += 1
            yield from split_documents(path, text_lines(path, on_decode_error, file_digest), source)
        digest.update(file_digest.digest())
    report.fingerprint = "sha256:" + digest.hexdigest()


def read_hf(source: CorpusSource, report: SourceReport) -> Iterator[str]:
    """Raw documents of an ``hf:<dataset>[:<config>]`` source, loaded with ``datasets`` (memory-mapped Arrow)
    and read in batches of records."""
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
    texts = (text for batch in dataset.select_columns([source.text_field]).iter(batch_size=HF_BATCH)
             for text in batch[source.text_field])
    if source.document_boundary == "file":  # one record, one document
        yield from texts
    else:  # records are lines (as in wikitext); blank records end documents
        yield from split_blocks(line for text in texts for line in text.split("\n"))


def source_name(source: CorpusSource) -> str:
    """A machine-independent name for a source: the hf id, or the file/folder name."""
    return source.path if source.is_hf else Path(source.path).name


def read_source(source: CorpusSource, on_decode_error: str, report: SourceReport) -> Iterator[str]:
    if source.is_hf:
        return read_hf(source, report)
    return read_local(source, on_decode_error, report)
