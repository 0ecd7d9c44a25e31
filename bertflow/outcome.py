"""A stage's outcome as data: what ``bertflow <stage>`` leaves for whoever started it (the Prefect flow).

When ``$BERTFLOW_OUTCOME_DIR`` is set, the command writes ``<dir>/<stage>.json`` atomically as it ends:
``{"stage", "status", "exit_code", "message", "error_type"}`` with status ``succeeded``, ``bad_input``
(bad params or input: exit 2, retrying cannot help) or ``failed`` (anything else, possibly transient).
The message is the whole text of the error, every line of it. Without the variable nothing is written.
Under torchrun rank 0 writes it (every rank meets the same input), never the launcher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bertflow.io import write_json

ENV = "BERTFLOW_OUTCOME_DIR"
SUCCEEDED, BAD_INPUT, FAILED = "succeeded", "bad_input", "failed"


def outcome_path(folder: str | Path, stage: str) -> Path:
    return Path(folder) / f"{stage}.json"


def record(stage: str, status: str, exit_code: int, message: str = "", error_type: str | None = None) -> dict:
    return {"stage": stage, "status": status, "exit_code": exit_code, "message": message, "error_type": error_type}


def write_outcome(stage: str, status: str, exit_code: int, error: BaseException | None = None) -> Path | None:
    """Write the record where ``$BERTFLOW_OUTCOME_DIR`` says; returns its path (None when unset)."""
    folder = os.environ.get(ENV)
    if not folder:
        return None
    path = outcome_path(folder, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record(stage, status, exit_code, str(error) if error else "",
                            type(error).__name__ if error else None))
    return path


def read_outcome(folder: str | Path, stage: str) -> dict | None:
    """The record of the stage's last command in ``folder``; None when the command never got to write one."""
    path = outcome_path(folder, stage)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
