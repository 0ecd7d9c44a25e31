"""MLflow tracking of a pipeline run, written after the fact from what the stages left on disk.

Reads: the params in force, ``reports/<stage>.json`` with ``reports/timing/<stage>.json`` (its seconds and its
real start and end; bertflow/timings.py), the curves ``reports/pretrain/*.csv``, ``reports/finetune/*.csv``, ...
(each row's ``time``), the training stages' CPU and memory samples ``reports/timing/<stage>.csv``,
``reports/evaluate/confusion.png``, ``dvc.lock`` (and the DVC cache's manifests of the data folders),
``dvc.yaml``, ``params.yaml`` and git.
Writes (to the tracking server or the embedded SQLite store): one parent run per pipeline run with
all params flattened, lineage tags (``mlflow.source.git.*`` too), the data sets it was built from (MLflow
datasets whose digest is DVC's md5) and the evaluation figures, and one nested run per stage with its own
params, its report's numbers, its curves (metrics with steps, each at the time its row was written) and,
for the training stages, ``system/...`` metrics; every run starts and ends when its stage did. The stages
never talk to MLflow (it need not be up while they run): this writes their record afterwards, with the
times they recorded. Weights are not logged here: the classifier is logged once, as the registered model
(tasks/register.py), and the test figures are logged to it (``model_id``); checkpoints never.
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
from pathlib import Path

import yaml

from bertflow import stages, timings
from bertflow.paths import Paths

STAGE_ORDER = stages.before("register")  # the stages whose reports and curves register tracks
EMBEDDED_DIR = "mlruns"  # under the project root: mlflow.db (runs + registry) and artifacts/
CURVES = {"lm_baselines": ("lm_baselines/lstm.csv",),
          "pretrain": ("pretrain/train.csv", "pretrain/eval.csv"),
          "finetune": ("finetune/pretrained.csv", "finetune/random_init.csv"),
          "optimize": ("optimize/distill.csv", "optimize/prune.csv")}
# the data sets of a run, as MLflow datasets: name → (path, the context tag, the stage runs that read it)
DATASETS = {"corpus": ("data/corpus", "pretraining", ("pretrain_data",)),
            "labeled/train": ("data/labeled/train.parquet", "training", ("finetune",)),
            "labeled/dev": ("data/labeled/dev.parquet", "validation", ("finetune",)),
            "labeled/test": ("data/labeled/test.parquet", "test", ("evaluate",))}
TEST_DATASET = "labeled/test"  # the test figures are measured on it


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


def dvc_lock_hashes(lock_file: Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{path: md5}`` of every dep and out recorded in dvc.lock (of the stages ``names`` only, when given;
    empty without a lock)."""
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    hashes = {}
    for name, stage in (lock.get("stages") or {}).items():
        if names is not None and name not in names:
            continue
        for entry in [*(stage.get("deps") or []), *(stage.get("outs") or [])]:
            if entry.get("md5"):
                hashes[entry["path"]] = entry["md5"]
    return hashes


def dvc_digest(root: Path, relative: str, hashes: dict[str, str]) -> str | None:
    """DVC's md5 of a data set: dvc.lock's record of it; for a file inside a recorded folder, the folder's
    manifest in the DVC cache (``.dvc/cache/files/md5``); else the md5 of the file's bytes, which is what DVC 3
    records for a file. None when it is not there at all."""
    if relative in hashes:
        return str(hashes[relative])  # YAML reads an all-digit md5 as a number
    path = root / relative
    parent, name = relative.rpartition("/")[::2]
    folder_md5 = str(hashes.get(parent, ""))
    manifest = root / ".dvc" / "cache" / "files" / "md5" / folder_md5[:2] / folder_md5[2:]
    if folder_md5.endswith(".dir") and manifest.is_file():
        for entry in json.loads(manifest.read_text()):
            if entry.get("relpath") == name:
                return entry["md5"]
    if path.is_file():
        digest = hashlib.md5()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return None


def data_sets(root: Path) -> dict[str, tuple[str, str, str]]:
    """``{name: (path, digest, context)}`` of the DATASETS present, digests from the stages before register
    (register's own dvc.lock entry is the previous run's)."""
    hashes = dvc_lock_hashes(root / "dvc.lock", STAGE_ORDER)
    found = {}
    for name, (relative, context, _) in DATASETS.items():
        digest = dvc_digest(root, relative, hashes)
        if digest is not None:
            found[name] = (relative, digest, context)
    return found


def curve_points(rows: list[tuple[int, dict[str, float]]], fallback_ms: int) -> list[tuple[str, float, int, int]]:
    """(name, value, timestamp ms, step) of a curve's rows: each at its ``time`` column, else ``fallback_ms``."""
    points = []
    for step, values in rows:
        values = dict(values)
        stamp = values.pop("time", None)
        timestamp = int(stamp * 1000) if stamp is not None else fallback_ms
        points += [(key, value, timestamp, step) for key, value in values.items()]
    return points


# ---------------------------------------------------------------- lineage (reads git, env)


def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the project root's git checkout, else of the code's."""
    for folder in (root, Path(__file__).resolve().parents[1]):
        try:
            commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower(), **git_source(folder, commit)}
        except (OSError, subprocess.CalledProcessError):
            continue
    return {"git_commit": "unknown", "git_dirty": "unknown"}


def git_source(folder: Path, commit: str) -> dict[str, str]:
    """MLflow's own source tags (``mlflow.source.git.commit``, ``.branch``, ``.repoURL``), as its UI shows them;
    the branch is left out on a detached HEAD, the URL without a remote ``origin`` (credentials redacted)."""
    def git(*args: str) -> str:
        found = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
        return found.stdout.strip() if found.returncode == 0 else ""

    tags = {"mlflow.source.git.commit": commit}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    url = git("config", "--get", "remote.origin.url")
    if url:
        from bertflow.registry import redact

        tags["mlflow.source.git.repoURL"] = redact(url)
    return tags


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
        tags[f"dvc.{path}"] = str(md5)  # YAML reads an all-digit md5 as a number
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
    """The parent run with params, tags, data sets and evaluation figures (the test figures go to the model,
    ``log_model_metrics``), and a nested run per stage; each run starts and ends when its stage(s) did."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    now = timings.now_ms()
    stage_times = {stage: timings.read_timing(paths, stage) for stage in STAGE_ORDER}
    starts = [t["start"] for t in stage_times.values() if t.get("start")]
    parent = client.create_run(experiment_id, run_name="pipeline", tags=tags, start_time=min(starts, default=now))
    run_id = parent.info.run_id
    flat = flatten(params)
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    found = data_sets(paths.root)
    log_data_sets(client, run_id, paths, found, list(found))
    evaluation = read_report(paths, "evaluate")
    evaluated = stage_times["evaluate"].get("end", now)
    client.log_batch(run_id, metrics=[Metric(k, v, evaluated, 0) for k, v in numeric(evaluation).items()
                                      if not k.startswith("test.")])
    for stage in STAGE_ORDER:
        report = read_report(paths, stage)
        started, ended = stage_times[stage].get("start", now), stage_times[stage].get("end", now)
        child = client.create_run(experiment_id, run_name=stage, start_time=started,
                                  tags={MLFLOW_PARENT_RUN_ID: run_id, MLFLOW_RUN_NAME: stage, "stage": stage})
        stage_params = flatten(params.get(stage, {}))
        metrics = [Metric(k, v, ended, 0) for k, v in numeric(report).items()]
        metrics += curve_metrics(paths, stage, ended) + system_metrics(paths, stage)
        client.log_batch(child.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in stage_params.items()],
                         tags=[RunTag("status_report", f"reports/{stage}.json")])
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            client.log_batch(child.info.run_id, metrics=metrics[start:start + 1000])
        log_data_sets(client, child.info.run_id, paths, found,
                      [name for name, (_, _, readers) in DATASETS.items() if stage in readers])
        client.set_terminated(child.info.run_id, end_time=ended)
    return run_id


def curve_metrics(paths: Paths, stage: str, fallback_ms: int) -> list:
    """A stage's curves as metrics with steps, each at the time its row was written (``fallback_ms``, the
    stage's end, for curves written without a ``time`` column)."""
    from mlflow.entities import Metric

    metrics = []
    for relative in CURVES.get(stage, ()):
        name = Path(relative).stem
        for key, value, timestamp, step in curve_points(read_curve(paths.reports / relative), fallback_ms):
            metrics.append(Metric(f"{name}.{key}", value, timestamp, step))
    return metrics


def system_metrics(paths: Paths, stage: str) -> list:
    """The CPU and memory samples of a training stage as ``system/<name>`` metrics at their times (MLflow's
    names, as its own system-metrics monitor logs them; step = the sample's number)."""
    from mlflow.entities import Metric

    metrics = []
    for step, row in enumerate(timings.read_system(paths, stage)):
        stamp = int(row.pop("time") * 1000)
        metrics += [Metric(f"system/{key}", value, stamp, step) for key, value in row.items()]
    return metrics


def data_set(paths: Paths, name: str, relative: str, digest: str):
    """An MLflow dataset for a data set of the run: its path as a local source, DVC's md5 as its digest."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    source = get_dataset_source_from_json(json.dumps({"uri": str((paths.root / relative).resolve())}), "local")
    return MetaDataset(source, name=name, digest=digest)


def log_data_sets(client, run_id: str, paths: Paths, found: dict, names: list[str]) -> None:
    """``log_inputs`` of the named data sets (those present), each tagged with its context."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(data_set(paths, name, found[name][0], found[name][1])._to_mlflow_entity(),
                           [InputTag(MLFLOW_DATASET_CONTEXT, found[name][2])]) for name in names if name in found]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def log_model_metrics(client, run_id: str, model_id: str, figures: dict, paths: Paths, prefix: str = "test.") -> None:
    """Test figures as metrics of the logged model (``model_id``) and of the run, on the test data set (name
    and DVC digest), at the time evaluate ended: the experiment's Models view lists and sorts models by them."""
    from mlflow.entities import Metric

    test = data_sets(paths.root).get(TEST_DATASET)
    dataset = {"dataset_name": TEST_DATASET, "dataset_digest": test[1]} if test else {}
    timestamp = timings.read_timing(paths, "evaluate").get("end") or timings.now_ms()
    metrics = [Metric(f"{prefix}{key}", value, timestamp, 0, model_id=model_id, **dataset)
               for key, value in numeric(figures).items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


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
    """A stage's figures: ``reports/<stage>.json`` with its timings merged back (``reports/timing/``), or {}
    when the stage has not written it."""
    return timings.read_stage_report(paths, stage)
