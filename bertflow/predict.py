"""``bertflow predict``: the registered classifier (or any of its forms) on texts, from the command line.

Reads: a model, by ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run>/<path>`` (any
URI MLflow resolves) or a local folder (a logged MLflow model, or a classifier / variant folder as
``bertflow finetune`` and ``bertflow optimize`` write them); texts from arguments, from ``--input``
(``.txt`` one per line, blank lines skipped; ``.csv``, ``.tsv``, ``.jsonl`` with ``--text-column``) or
from standard input, one per line. Writes: to standard output or ``--output``, one row per text with
``label``, ``score_<label>`` per class and ``truncated`` (the text was longer than the model and was
cut), as a table, JSON lines or CSV; a progress bar on standard error for long inputs.

A model that cannot be found, a registry that does not answer, a missing file or column, or a text
the model refuses (empty, whitespace only): exit code 2 and one message naming it (``PredictError``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bertflow import serving

CHUNK = 256  # texts per call: the progress bar's step
PROGRESS_FROM = 2 * CHUNK  # inputs at least this long get a progress bar
TABLE_WIDTH = 60  # characters of each text the table shows


class PredictError(Exception):
    """What the user got wrong or what is not there, in one line; the command exits 2."""


# ---------------------------------------------------------------- texts in


def read_texts(texts: list[str], input_file: str | None, column: str, stdin=None) -> list[str]:
    """The texts to classify: the arguments, else ``--input`` (``-``: standard input), else standard input."""
    if texts and input_file:
        raise PredictError("give texts as arguments or --input, not both")
    if texts:
        return list(texts)
    if input_file in (None, "-"):
        stdin = sys.stdin if stdin is None else stdin
        return [line.rstrip("\n") for line in stdin if line.strip()]
    return read_file(Path(input_file), column)


def read_file(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise PredictError(f"--input {path}: no such file")
    kind = path.suffix.lower()
    if kind == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    readers: dict[str, Callable[[Path], pd.DataFrame]] = {
        ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
        ".tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, quoting=3),
        ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False)}
    if kind not in readers:
        raise PredictError(f"--input {path}: unknown kind {kind or '(no suffix)'}; give .txt, .csv, .tsv or .jsonl")
    try:
        frame = readers[kind](path)
    except (ValueError, pd.errors.ParserError) as exc:
        raise PredictError(f"--input {path}: not readable as {kind[1:]}: {str(exc).splitlines()[0]}") from None
    if column not in frame.columns:
        raise PredictError(f"--input {path}: no column {column!r} (columns: {', '.join(map(str, frame.columns))}); "
                           "name it with --text-column")
    return list(frame[column])


# ---------------------------------------------------------------- the model


def open_predictor(model: str, root: Path) -> Callable[[list[str]], pd.DataFrame]:
    """texts -> the serving frame, for a local folder or anything MLflow resolves."""
    folder = Path(model)
    if folder.is_dir() and not (folder / "MLmodel").is_file():
        if not (folder / "config.json").is_file():
            raise PredictError(f"--model {model}: a folder without config.json or MLmodel is not a model")
        loaded = serving.open_model(folder)
        return lambda texts: loaded.frame(serving.as_texts(texts))
    if "://" not in model and ":/" not in model and not folder.exists():
        raise PredictError(f"--model {model}: no such folder, and not a models:/ or runs:/ URI")
    return mlflow_predictor(model, root)


def mlflow_predictor(uri: str, root: Path) -> Callable[[list[str]], pd.DataFrame]:
    import warnings

    import mlflow
    from mlflow.exceptions import MlflowException

    from bertflow import tracking
    from bertflow.paths import Paths
    from bertflow.registry import redact

    registry = tracking.tracking_uri(None, Paths(root))
    mlflow.set_tracking_uri(registry)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a registry that does not answer: fail soon
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # serving.py's signature
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:  # OSError: connection refused, a missing local artifact
        text = str(exc)
        if any(sign in text for sign in ("Max retries exceeded", "Connection refused", "timed out")):
            raise PredictError(f"--model {uri}: the registry at {redact(registry)} did not answer") from None
        raise PredictError(f"--model {uri}: {first_line(exc)} (registry {redact(registry)})") from None

    def predict(texts: list[str]) -> pd.DataFrame:
        try:
            return loaded.predict(texts)
        except MlflowException as exc:
            raise PredictError(first_line(exc).removeprefix("bad request: ")) from None

    return predict


def first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[-1] if "Error: " in text else text.strip().splitlines()[0]


def predict_all(predict: Callable[[list[str]], pd.DataFrame], texts: list[str], progress: bool) -> pd.DataFrame:
    """Every text through ``predict`` in chunks (a progress bar on standard error for long inputs)."""
    from tqdm import tqdm

    bar = tqdm(total=len(texts), unit="text", file=sys.stderr, disable=not progress or len(texts) < PROGRESS_FROM)
    frames = []
    for start in range(0, len(texts), CHUNK):
        try:
            frames.append(predict(texts[start:start + CHUNK]))
        except serving.BadInput as exc:
            raise PredictError(shift_item(str(exc), start)) from None
        except PredictError as exc:
            raise PredictError(shift_item(str(exc), start)) from None
        bar.update(min(CHUNK, len(texts) - start))
    bar.close()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["label", "truncated"])


def shift_item(message: str, offset: int) -> str:
    """"item 3 ..." of a chunk as "text 260 ..." of the whole input (counted from 1, as lines are)."""
    words = message.split(" ", 2)
    if len(words) == 3 and words[0] == "item" and words[1].isdigit():
        return f"text {int(words[1]) + offset + 1} {words[2]}"
    return message


# ---------------------------------------------------------------- rows out


def render(frame: pd.DataFrame, texts: list[str], kind: str) -> str:
    rows = frame.assign(text=texts)[["text", *frame.columns]]
    if kind == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows.to_dict("records"))
    if kind == "csv":
        return rows.to_csv(index=False)
    shown = rows.assign(text=[shorten(t) for t in texts])
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4f}") + "\n"


def shorten(text: str) -> str:
    return text if len(text) <= TABLE_WIDTH else text[:TABLE_WIDTH - 1] + "…"


def write(output: str | None, content: str) -> None:
    if output is None:
        sys.stdout.write(content)
        return
    target = Path(output)
    if not target.parent.is_dir():
        raise PredictError(f"--output {target}: folder {target.parent} does not exist")
    partial = target.with_name(target.name + ".partial")
    partial.write_text(content, encoding="utf-8")
    partial.replace(target)  # never a half-written output


def run(model: str, texts: list[str], input_file: str | None, column: str, kind: str, output: str | None,
        root: Path, progress: bool = True) -> int:
    """``bertflow predict``; returns the exit code (2 with one message on standard error for bad input)."""
    try:
        found = read_texts(texts, input_file, column)
        if not found:
            raise PredictError("no texts: give them as arguments, with --input, or on standard input")
        frame = predict_all(open_predictor(model, root), found, progress)
        write(output, render(frame, found, kind))
    except PredictError as exc:
        print(f"bertflow predict: error: {exc}", file=sys.stderr)
        return 2
    return 0
