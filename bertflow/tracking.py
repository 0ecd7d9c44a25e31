"""MLflow tracking of a pipeline run, written after the fact from what the stages left on disk.

Reads: the params in force, ``reports/<stage>.json``, the curves ``reports/pretrain/*.csv`` and
``reports/finetune/*.csv``, ``reports/evaluate/confusion.png``, ``dvc.lock``, ``dvc.yaml``, ``params.yaml``
and git.
Writes (to the tracking server or the embedded SQLite store): one parent run per pipeline run with
all params flattened, lineage tags and the evaluation figures, and one nested run per stage with
its own params, its report's numbers and its curves (metrics with steps). Weights are not logged
here: the classifier is logged once, as the registered model (tasks/register.py); checkpoints never.
What ``bertflow restore`` brings back (bertflow/restore.py) goes under the run's artifact folder
``restore/``: ``dvc.lock`` and ``params.yaml`` as they stand while register runs, and ``outs/<path>``, the
outputs the stages before register keep out of the DVC cache (``cache: false``: reports, curves), with the
tag ``restore.dvc_lock_md5``.

Both drivers end in the same place: ``dvc repro`` and the Prefect flow call ``bertflow register``,
which calls this, so a run is tracked however it was started.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bertflow import stages
from bertflow.paths import Paths

STAGE_ORDER = stages.before("register")  # the stages whose reports and curves register tracks
EMBEDDED_DIR = "mlruns"  # under the project root: mlflow.db (runs + registry) and artifacts/
CURVES = {"lm_baselines": ("lm_baselines/lstm.csv",),
          "pretrain": ("pretrain/train.csv", "pretrain/eval.csv"),
          "finetune": ("finetune/pretrained.csv", "finetune/random_init.csv"),
          "optimize": ("optimize/distill.csv", "optimize/prune.csv")}


# ---------------------------------------------------------------- where (pure)


def tracking_uri(configured: str | None, paths: Paths) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``register.tracking_uri``, else SQLite under ``mlruns/``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{(paths.root / EMBEDDED_DIR / 'mlflow.db').resolve()}"


def embedded_artifacts(uri: str, paths: Paths) -> str | None:
    """The artifact folder of a new experiment in the embedded store (a server chooses its own)."""
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (paths.root / EMBEDDED_DIR / "artifacts").resolve().as_uri()
    return None


# ---------------------------------------------------------------- what (pure)


def flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become JSON strings."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def numeric(mapping: dict) -> dict[str, float]:
    """The numbers of a flattened report (booleans and strings left out), as MLflow metric names."""
    return {key.replace(" ", "_"): float(value) for key, value in flatten(mapping).items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def read_curve(path: Path) -> list[tuple[int, dict[str, float]]]:
    """Rows of a metrics CSV as (step, {name: value}); non-numeric cells are skipped."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, value in row.items():
                if key == "step":
                    continue
                try:
                    values[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append((int(row["step"]), values))
    return rows


def dvc_lock_hashes(lock_file: Path) -> dict[str, str]:
    """``{path: md5}`` of every dep and out recorded in dvc.lock (empty without one)."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in [*(stage.get("deps") or []), *(stage.get("outs") or [])]:
            if entry.get("md5"):
                hashes[entry["path"]] = entry["md5"]
    return hashes


# ---------------------------------------------------------------- lineage (reads git, env)


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the project root's git checkout, else of the code's."""
    for folder in (root, Path(__file__).resolve().parents[1]):
        try:
            commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
        except (OSError, subprocess.CalledProcessError):
            continue
    return {"git_commit": "unknown", "git_dirty": "unknown"}


def git_revision(root: Path) -> str:
    """The short commit, marked when the work tree has uncommitted changes (for people to read)."""
    state = git_state(root)
    if state["git_commit"] == "unknown":
        return "not a git checkout"
    return state["git_commit"][:7] + (" (uncommitted changes)" if state["git_dirty"] == "true" else "")


def lock_digest(root: Path) -> str:
    """md5 of dvc.lock: one value naming every data set and artifact of the run ("none" without one)."""
    lock = root / "dvc.lock"
    return hashlib.md5(lock.read_bytes()).hexdigest() if lock.is_file() else "none"


def prefect_flow_run_id() -> str | None:
    """The Prefect flow run this process belongs to, if any (in-process runtime, or inherited env).

    A process that has not imported Prefect runs no flow itself, so the answer is the environment's
    (the flow hands its id to the stage commands) without the seconds of importing Prefect to ask.
    """
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID")
    if flow_run or "prefect" not in sys.modules:
        return flow_run or None
    try:
        from prefect.runtime import flow_run as runtime
        return runtime.get_id()
    except Exception:  # noqa: BLE001 - no Prefect, or not inside a flow run
        return None


def lineage_tags(paths: Paths) -> dict[str, str]:
    tags = git_state(paths.root)
    for path, md5 in dvc_lock_hashes(paths.root / "dvc.lock").items():
        tags[f"dvc.{path}"] = md5
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags["prefect_flow_run_id"] = str(flow_run)
    tags.update(experiment_tags())
    return tags


def experiment_tags() -> dict[str, str]:
    """The DVC experiment this run belongs to: ``DVC_EXP_NAME``, which ``dvc exp run`` and the flow set for the
    stages (issue 21; the flow adds ``dvc_exp_ref``, the experiment's commit, once ``dvc exp save`` made it)."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"dvc_exp_name": name} if name else {}


# ---------------------------------------------------------------- logging (writes to MLflow)


def log_pipeline_run(client, experiment_id: str, params: dict, paths: Paths, tags: dict[str, str]) -> str:
    """The parent run with params, tags and evaluation figures, and a nested run per stage."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    parent = client.create_run(experiment_id, run_name="pipeline", tags=tags)
    run_id = parent.info.run_id
    now = int(time.time() * 1000)
    flat = flatten(params)
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    evaluation = read_report(paths, "evaluate")
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in numeric(evaluation).items()])
    for stage in STAGE_ORDER:
        report = read_report(paths, stage)
        child = client.create_run(experiment_id, run_name=stage,
                                  tags={MLFLOW_PARENT_RUN_ID: run_id, MLFLOW_RUN_NAME: stage, "stage": stage})
        stage_params = flatten(params.get(stage, {}))
        metrics = [Metric(k, v, now, 0) for k, v in numeric(report).items()]
        metrics += curve_metrics(paths, stage, now)
        client.log_batch(child.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in stage_params.items()],
                         tags=[RunTag("status_report", f"reports/{stage}.json")])
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            client.log_batch(child.info.run_id, metrics=metrics[start:start + 1000])
        client.set_terminated(child.info.run_id)
    return run_id


def curve_metrics(paths: Paths, stage: str, timestamp: int) -> list:
    from mlflow.entities import Metric

    metrics = []
    for relative in CURVES.get(stage, ()):
        name = Path(relative).stem
        for step, values in read_curve(paths.reports / relative):
            metrics += [Metric(f"{name}.{key}", value, timestamp, step) for key, value in values.items()]
    return metrics


def log_report_artifacts(client, run_id: str, paths: Paths, model_card: str) -> None:
    """Reports (JSON + curves), the confusion matrix PNG and the model card: small files only."""
    for stage in STAGE_ORDER:
        report = paths.report(stage)
        if report.is_file():
            client.log_artifact(run_id, str(report), "reports")
    for relative in [*(curve for curves in CURVES.values() for curve in curves), "evaluate/confusion.png",
                     "evaluate/predictions.csv"]:
        path = paths.reports / relative
        if path.is_file():
            client.log_artifact(run_id, str(path), f"reports/{Path(relative).parent}")
    client.log_text(run_id, model_card, "model_card.md")


RESTORE_FOLDER = "restore"  # the run's artifact folder that `bertflow restore` reads
RESTORE_LOCK_TAG = "restore.dvc_lock_md5"  # md5 of the dvc.lock recorded there


def uncached_outputs(dvc_yaml: Path, names: tuple[str, ...]) -> list[str]:
    """The outputs dvc.yaml keeps out of the DVC cache (``cache: false``) for the stages ``names``, less the
    persisted ones (checkpoints: resume state, large, not part of what a version is): the small reports and
    curves that ``dvc checkout`` cannot bring back."""
    document = yaml.safe_load(dvc_yaml.read_text()) if dvc_yaml.is_file() else {}
    found = []
    for name in names:
        entry = (document.get("stages") or {}).get(name) or {}
        for item in [item for kind in ("outs", "metrics", "plots") for item in entry.get(kind) or []]:
            path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
            if (options or {}).get("cache") is False and not (options or {}).get("persist"):
                found.append(path)
    return found


def log_restore_data(client, run_id: str, paths: Paths) -> None:
    """What ``bertflow restore`` needs, as artifacts ``restore/`` of the run: dvc.lock and params.yaml as they
    stand now (DVC has written the lock entry of every stage before register: their deps' and outs' hashes),
    and ``outs/<path>``, the uncached outputs of those stages; tag ``restore.dvc_lock_md5``. Each file is read
    once, into a copy, so what is logged and its md5 agree. Without a dvc.lock (register run by hand outside
    DVC) there is nothing to restore from, and nothing is logged."""
    if not (paths.root / "dvc.lock").is_file():
        return
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder)
        for name in ("dvc.lock", "params.yaml"):
            if (paths.root / name).is_file():
                shutil.copyfile(paths.root / name, copy / name)
        for relative in uncached_outputs(paths.root / "dvc.yaml", STAGE_ORDER):
            source, target = paths.root / relative, copy / "outs" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            elif source.is_file():
                shutil.copyfile(source, target)
        client.log_artifacts(run_id, folder, RESTORE_FOLDER)
        client.set_tag(run_id, RESTORE_LOCK_TAG, hashlib.md5((copy / "dvc.lock").read_bytes()).hexdigest())


def read_report(paths: Paths, stage: str) -> dict:
    """``reports/<stage>.json``, or {} when the stage has not written it."""
    path = paths.report(stage)
    return json.loads(path.read_text()) if path.is_file() else {}
