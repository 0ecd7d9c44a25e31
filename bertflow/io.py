"""Atomic file-system writes shared by every stage.

A stage builds its outputs in a temporary sibling folder and renames it into place only when the
whole output is complete, so a crash or an error never leaves a half-written output that looks
valid. Nothing here knows about any particular stage.

An output folder is never left empty: where a stage writes nothing into one (its optional parts that
write there are off), the folder gets a note, ``EMPTY.md``, saying so. The report folders are uncached
DVC outputs that git holds, and git keeps no empty folder, so ``dvc exp save`` would find the output
missing; a folder that holds anything else is left exactly as the stage wrote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dirs(targets: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield one empty temporary folder per target; on success replace each target by its folder, a folder
    left empty holding a note (``EMPTY.md``) that says why.

    On any exception the temporary folders are removed and the targets are left as they were.
    """
    staged: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(target)
            folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            folder.chmod(0o755)  # mkdtemp makes 0700; outputs are ordinary shared folders
            staged.append(folder)
        yield staged
    except BaseException:
        for folder in staged:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for folder, target in zip(staged, targets, strict=True):
        if not any(folder.iterdir()):
            _note_empty(folder, target)
        _replace_dir(folder, target)


EMPTY_NOTE = "EMPTY.md"  # the one file of an output folder its stage wrote nothing into


def _note_empty(folder: Path, target: Path) -> None:
    """The note of an output folder left empty: an empty folder is not in git, which holds the uncached
    report folders, so `dvc exp save` would fail on it ('output ... does not exist')."""
    name = target.name if target.parent.name in ("", ".") else f"{target.parent.name}/{target.name}"
    (folder / EMPTY_NOTE).write_text(
        f"# {name}: nothing written in this run\n\n"
        "The stage that writes this folder wrote nothing into it: the parts of it that write here were off in\n"
        "params.yaml. This note keeps the folder, a DVC output, in git (which keeps no empty folder), so that\n"
        "`dvc exp save` records it.\n", encoding="utf-8")
    (folder / EMPTY_NOTE).chmod(0o644)


def remove_leftovers(target: Path) -> None:
    """Remove what a killed writer of ``target`` left beside it (its temporary and replaced copies).

    A process killed with SIGKILL runs no clean-up; its ``.name.tmp-*`` / ``.name.old-*`` siblings are
    never outputs, and one writer per target runs at a time (the pipeline lock), so they are stale.
    """
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``; the old target is removed only after the swap succeeded."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class InputError(ValueError):
    """Bad input data; the message names the file at fault (and line or byte offset where it applies)."""


def read_column(path: Path, column: str, producer: str = "ingest") -> list:
    """One column of a stage's Parquet output; a missing file names the stage that makes it."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(f"{path}: missing; run `bertflow {producer}` first")
    return pq.read_table(path, columns=[column])[column].to_pylist()


def iter_column(path: Path, column: str, producer: str = "ingest", batch_rows: int = 256) -> Iterator:
    """The values of one column of a stage's Parquet output, one row group at a time.

    Memory follows the file's largest row group (as Arrow data) and ``batch_rows`` values (as Python objects),
    not the file's size. Row groups are read one by one with ``read_row_group``: ``ParquetFile.iter_batches``
    (pyarrow 25) reads ahead across the row groups, its Arrow memory growing with the file. The missing-file
    check is made now, the reading when the result is iterated.
    """
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(f"{path}: missing; run `bertflow {producer}` first")
    reader = pq.ParquetFile(path)
    return (value for index in range(reader.metadata.num_row_groups)
            for value in _row_group_values(reader, index, column, batch_rows))


def _row_group_values(reader, index: int, column: str, batch_rows: int) -> Iterator:
    import pyarrow as pa

    values = reader.read_row_group(index, columns=[column]).column(0)
    for start in range(0, len(values), batch_rows):
        yield from values.slice(start, batch_rows).to_pylist()
    del values
    pa.default_memory_pool().release_unused()  # Arrow's allocator otherwise keeps each group's pages for a while
