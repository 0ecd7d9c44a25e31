"""Timings apart from results (bertflow/timings.py): the split, its inverse, the CPU/memory sampler, the curves'
wall-clock column, and what `dvc metrics diff` shows between two runs (real DVC)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bertflow import dvc_sync, timings
from bertflow.paths import Paths
from bertflow.training import MetricsLog

BIN = Path(sys.executable).parent


def test_split_puts_seconds_rates_and_logging_apart_and_merge_undoes_it():
    figures = {"steps": 9, "seconds": 1.5, "tokens_per_second": 300, "train_seconds": 1.0, "device": "cpu",
               "heldout": {"mlm_loss": 2.0, "eval_seconds": 0.5}, "logging": {"model_seconds": 2.0, "n": 1},
               "history": [{"step": 1, "seconds": 0.1}], "start": {}, "bigram": {"seconds": 3.0}}
    results, spent = timings.split(figures)
    assert results == {"steps": 9, "device": "cpu", "heldout": {"mlm_loss": 2.0},
                       "history": [{"step": 1, "seconds": 0.1}], "start": {}}  # lists stay (DVC reads no lists)
    assert spent == {"seconds": 1.5, "tokens_per_second": 300, "train_seconds": 1.0,
                     "heldout": {"eval_seconds": 0.5}, "logging": {"model_seconds": 2.0, "n": 1},
                     "bigram": {"seconds": 3.0}}
    assert timings.merge(results, spent) == figures
    assert timings.split({"accuracy": 0.5}) == ({"accuracy": 0.5}, {})
    assert not timings.is_timing("seconds_left_out") and timings.is_timing("mb_per_second")


def test_stage_reports_round_trip_with_start_and_end(tmp_path):
    paths = Paths(tmp_path)
    timings.write_stage_reports(paths, "pretrain", {"steps": 3, "seconds": 2.5}, 1_000, 3_500)
    assert json.loads(paths.report("pretrain").read_text()) == {"steps": 3}
    assert timings.read_timing(paths, "pretrain") == {"start": 1_000, "end": 3_500, "figures": {"seconds": 2.5}}
    assert timings.read_stage_report(paths, "pretrain") == {"steps": 3, "seconds": 2.5}
    assert timings.read_stage_report(paths, "finetune") == {}


def test_sampling_writes_mlflow_named_cpu_and_memory_rows_at_their_times(tmp_path):
    path = tmp_path / "reports" / "timing" / "pretrain.csv"
    before = time.time()
    with timings.sampling(path, interval=0.05):
        time.sleep(0.3)
    after = time.time()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(timings.SYSTEM_FIELDS)
    assert len(rows) >= 3  # every 50 ms and once at the end
    stamps = [float(row["time"]) for row in rows]
    assert before - 0.001 <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= after + 0.01
    assert all(0 <= float(row["system_memory_usage_percentage"]) <= 100 for row in rows)
    assert all(float(row["system_memory_usage_megabytes"]) > 0 for row in rows)
    assert timings.read_system(Paths(tmp_path), "pretrain")[0].keys() == set(timings.SYSTEM_FIELDS)


def test_sampling_writes_its_rows_also_when_the_stage_fails(tmp_path):
    path = tmp_path / "s.csv"
    try:
        with timings.sampling(path, interval=60):
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    assert len(path.read_text().splitlines()) == 2  # the header and the closing sample


def test_curve_rows_carry_the_wall_clock_they_were_written_at(tmp_path):
    before = time.time()
    log = MetricsLog(tmp_path / "train.csv", ["step", "loss"])
    log.write(step=1, loss=2.0)
    with open(tmp_path / "train.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["step"] == "1" and before - 0.001 <= float(row["time"]) <= time.time() + 0.001  # ms rounding
    resumed = MetricsLog(tmp_path / "train.csv", ["step", "loss"], resume_after_step=1)  # resume keeps the time
    resumed.write(step=2, loss=1.5)
    assert [line.split(",")[-1] for line in (tmp_path / "train.csv").read_text().splitlines()][:2] == [
        "time", row["time"]]


def test_sync_declares_timings_as_outputs_not_metrics(tmp_path):
    """Every stage gets its timing file as an uncached out (the training stages their CPU/memory CSV too)."""
    from tests.conftest import REPO

    document = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, entry in document["stages"].items():
        outs = {path for item in entry.get("outs", []) for path in ([item] if isinstance(item, str) else item)}
        metrics = {path for item in entry.get("metrics", []) for path in item}
        assert set(dvc_sync.timing_outs(name)) <= outs, name
        assert not any(path.startswith("reports/timing/") for path in metrics), name
    assert dvc_sync.timing_outs("pretrain") == ["reports/timing/pretrain.json", "reports/timing/pretrain.csv"]
    del document["stages"]["evaluate"]["outs"][-1]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(document))
    assert dvc_sync.missing_outs(document["stages"]["evaluate"], "evaluate") == ["reports/timing/evaluate.json"]


def dvc(folder: Path, *args: str) -> str:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=folder, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                   capture_output=True)


def test_dvc_metrics_diff_shows_what_changed_in_the_model_not_the_seconds(tmp_path):
    """Two runs of a stage whose results moved a little and whose timings moved a lot: `dvc metrics diff`
    names the result that changed and no timing; the timings are still there, as an output."""
    git(tmp_path, "init", "-q")
    dvc(tmp_path, "init", "-q")
    stage = {"cmd": "true", "outs": [{path: {"cache": False}} for path in dvc_sync.timing_outs("finetune")],
             "metrics": [{"reports/finetune.json": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"finetune": stage}}))
    paths = Paths(tmp_path)
    first = {"best_dev_accuracy": 0.75, "steps": 100, "seconds": 61.0, "tokens_per_second": 900,
             "pretrained": {"seconds": 60.0, "best_epoch": 2}}
    timings.write_stage_reports(paths, "finetune", first, 1_000, 62_000)
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first run")
    timings.write_stage_reports(paths, "finetune", {**first, "best_dev_accuracy": 0.8, "seconds": 75.5,
                                                    "tokens_per_second": 700,
                                                    "pretrained": {"seconds": 74.0, "best_epoch": 2}}, 5, 80_000)
    diff = json.loads(dvc(tmp_path, "metrics", "diff", "--json"))
    assert {path: list(changed) for path, changed in diff.items()} == {"reports/finetune.json": ["best_dev_accuracy"]}
    assert diff["reports/finetune.json"]["best_dev_accuracy"]["new"] == 0.8
    shown = json.loads(dvc(tmp_path, "metrics", "show", "--json"))
    assert "seconds" not in json.dumps(shown) and "tokens_per_second" not in json.dumps(shown)
    assert timings.read_stage_report(paths, "finetune")["pretrained"] == {"seconds": 74.0, "best_epoch": 2}
