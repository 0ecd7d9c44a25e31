"""A stage's timings apart from its results, and its real start and end, so `dvc metrics diff` shows the model.

A stage's ``run`` returns one mapping of figures; ``write_stage_reports`` splits it: the results go to
``reports/<stage>.json`` (a DVC metric), the timings (every key named ``seconds`` or ``*_seconds``,
``*_per_second``, and the ``logging`` section) to ``reports/timing/<stage>.json`` (a DVC out, not a metric),
with the stage's wall-clock ``start`` and ``end`` (epoch milliseconds) that tracking gives its MLflow run.
``read_stage_report`` merges the two back for the readers of a stage's figures (tracking, the report page).
The training stages (``stages.POOLED``) also sample CPU and memory while they run (``sampling``), into
``reports/timing/<stage>.csv`` under MLflow's system-metric names; tracking logs them as ``system/...``.
Reads the clock and psutil; writes the two files above.
"""

from __future__ import annotations

import contextlib
import csv
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bertflow import stages
from bertflow.io import InputError, read_json, write_json, write_text
from bertflow.paths import Paths

TIMING_SECTIONS = ("logging",)  # whole sections of timings (register's seconds spent logging)
SAMPLED = stages.POOLED  # the training stages: their CPU and memory over time
SYSTEM_FIELDS = ("time", "cpu_utilization_percentage", "system_memory_usage_megabytes",
                 "system_memory_usage_percentage")  # MLflow's own names (mlflow/system_metrics/metrics)
INTERVAL_VARIABLE = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # MLflow's knob, seconds; 10 when unset


# ---------------------------------------------------------------- pure


def is_timing(key: str) -> bool:
    """``seconds``, ``train_seconds``, ``tokens_per_second``: how long, not how good."""
    return key == "seconds" or key.endswith("_seconds") or key.endswith("_per_second")


def split(figures: dict) -> tuple[dict, dict]:
    """(results, timings) of a report mapping, nesting kept; lists stay with the results.

    >>> split({"steps": 9, "seconds": 1.5, "heldout": {"loss": 2.0, "eval_seconds": 0.5}})
    ({'steps': 9, 'heldout': {'loss': 2.0}}, {'seconds': 1.5, 'heldout': {'eval_seconds': 0.5}})
    """
    results, timings = {}, {}
    for key, value in figures.items():
        if key in TIMING_SECTIONS or (is_timing(key) and not isinstance(value, dict | list)):
            timings[key] = value
        elif isinstance(value, dict):
            inner_results, inner_timings = split(value)
            if inner_results or not inner_timings:
                results[key] = inner_results
            if inner_timings:
                timings[key] = inner_timings
        else:
            results[key] = value
    return results, timings


def merge(results: dict, timings: dict) -> dict:
    """The inverse of ``split``: ``merge(*split(x)) == x`` up to key order."""
    merged = dict(results)
    for key, value in timings.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in TIMING_SECTIONS:
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- files (edge)


def timing_path(paths: Paths, stage: str) -> Path:
    return paths.reports / "timing" / f"{stage}.json"


def system_path(paths: Paths, stage: str) -> Path:
    return paths.reports / "timing" / f"{stage}.csv"


def write_stage_reports(paths: Paths, stage: str, figures: dict, start_ms: int, end_ms: int) -> None:
    """``reports/<stage>.json`` (results) and ``reports/timing/<stage>.json`` (timings, start, end)."""
    results, timings = split(figures)
    write_json(paths.report(stage), results)
    write_json(timing_path(paths, stage), {"start": start_ms, "end": end_ms, "figures": timings})


def read_timing(paths: Paths, stage: str) -> dict:
    """``{"start": ms, "end": ms, "figures": {...}}``, or {} when the stage has not written it."""
    path = timing_path(paths, stage)
    return read_json(path) if path.is_file() else {}


def read_stage_report(paths: Paths, stage: str) -> dict:
    """A stage's figures as its ``run`` returned them: results and timings merged ({} when not run)."""
    path = paths.report(stage)
    results = read_json(path) if path.is_file() else {}
    return merge(results, read_timing(paths, stage).get("figures", {}))


def read_system(paths: Paths, stage: str) -> list[dict[str, float]]:
    """The CPU and memory samples of a training stage ({} rows when it took none)."""
    path = system_path(paths, stage)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle)]


def sample() -> dict[str, float]:
    """One sample of the machine, as MLflow's CPU monitor takes it."""
    import psutil

    memory = psutil.virtual_memory()
    return {"time": round(time.time(), 3), "cpu_utilization_percentage": psutil.cpu_percent(),
            "system_memory_usage_megabytes": round(memory.used / 1e6, 1),
            "system_memory_usage_percentage": round(memory.used / memory.total * 100, 1)}


@contextlib.contextmanager
def sampling(path: Path, interval: float | None = None) -> Iterator[list[dict]]:
    """Sample the machine at the start, every ``interval`` seconds (``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``,
    else 10) and once at the end, in a daemon thread; the rows go to ``path`` (CSV) when the block ends, also
    when it fails, but not when it refuses bad input (an ``InputError``:
    nothing ran, nothing is left behind). ``cpu_percent`` is the load since the previous sample, so one at the start
    only primes it."""
    interval = float(interval or os.environ.get(INTERVAL_VARIABLE) or 10)
    rows: list[dict] = []
    stop = threading.Event()
    sample()  # primes psutil.cpu_percent: its first reading is meaningless, so it is not kept

    def loop() -> None:
        while not stop.wait(interval):
            rows.append(sample())

    thread = threading.Thread(target=loop, name="system-metrics", daemon=True)
    thread.start()
    refused = False
    try:
        yield rows
    except InputError:
        refused = True  # bad input or params: the stage did no work, and leaves nothing behind
        raise
    finally:
        stop.set()
        thread.join()
        if not refused:
            rows.append(sample())
            lines = [",".join(SYSTEM_FIELDS)] + [",".join(str(row[field]) for field in SYSTEM_FIELDS) for row in rows]
            write_text(path, "\n".join(lines) + "\n")
