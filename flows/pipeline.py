"""The pipeline as a Prefect 3 flow: ingest → tokenizer → lm_baselines → pretrain_data → pretrain → finetune →
evaluate → attention → optimize → register → report.

Each task runs its stage through DVC (``dvc repro --single-item <stage>``), i.e. the very
``bertflow <stage>`` command of dvc.yaml, so the two drivers share one record of what was built
from what: DVC decides what is skipped, writes dvc.lock and caches the outputs, whether the run
was started by Prefect or by ``dvc repro``. One ``dvc status`` at the start names the stages that
changed; the unchanged ones before the first changed stage are skipped without starting a
``dvc repro`` each (about two seconds apiece: a nightly run with nothing new takes seconds), and
from the first changed stage on every stage goes through ``dvc repro``. After the stages, the
outputs are pushed to the DVC remote and the dvc.lock of the run is logged to the MLflow run that
registered the model.

Every run is a DVC experiment (bertflow/experiments.py): the raw inputs imported under data/raw are
``dvc update``d first, the stages run with ``DVC_EXP_NAME`` set (as ``dvc exp run`` sets it), and at the end
``dvc exp save`` records the workspace, so ``dvc exp show``/``diff``/``apply`` know the run; the MLflow run
that registered the model is tagged with the experiment's name and commit. ``--set`` writes into params.yaml
as ``dvc exp run -S`` does; a ``--profile`` run leaves the workspace as it found it (as ``dvc exp run --temp``
does) and lives in its experiment (``dvc exp apply <name>`` brings it back).

Reads: the project root's params.yaml (or the profile ``params_file`` for one run) and dvc.yaml; Prefect's own
settings come from ``prefect.toml`` in the working directory (Prefect's rule), then the environment.
Writes: what the stages write, ``.dvc/tmp/bertflow-pipeline.lock`` (a ``filelock`` lock) and
``.dvc/tmp/bertflow-pipeline.holder`` (who holds it) while it runs (one run at a time), the DVC remote,
the experiment's git ref, the MLflow run's ``dvc.lock`` artifact and experiment tags, a Prefect markdown
artifact summarising the run, table artifacts of the stages and the variants, a link artifact to the run
report (reports/report.html), and the events ``bertflow.model.registered``/``bertflow.model.promoted`` when
register made a version (flows/publish.py).
Every stage task has a timeout derived from the stage's budget in params.yaml (``stage_timeout``).

With ``distributed.work_pool`` set, the training stages (pretrain, finetune) go to that Prefect
work pool instead: the flow starts the ``bertflow-stage/<distributed.deployment>`` deployment for
each (``bertflow-flow deploy-training`` creates it) and waits for its flow run. A worker of the
pool (``prefect worker start --pool <pool>``: a process pool here, a Kubernetes or Docker pool by
configuration) runs the same ``dvc repro --single-item`` in the same project, so the record stays one.

    bertflow-flow run [--root .] [--profile FILE] [--set finetune.learning_rate=5e-5 ...] [--name EXP]
    bertflow-flow serve            # a deployment on the cron schedule of params.yaml's `schedule`
    bertflow-flow deploy-training [--image REF] [--job-variable KEY=VALUE ...]
                                   # the stage deployment on params.yaml's `distributed.work_pool`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from bertflow import experiments, lifeline, outcome, stages, tracking
from bertflow.paths import Paths
from bertflow.summary import closing_text
from bertflow.tracking import prefect_flow_run_id
from flows import publish

STAGES = stages.PIPELINE
POOLED = stages.POOLED  # the stages a training work pool takes, when params name one
STAGE_FLOW = "bertflow-stage"
# I/O-bound stages are retried (remote sources may hiccup), training never, and bad input never: it
# fails the same way every time. register retries the registry itself (register.retries, back-off).
RETRIED = {"ingest": 2}
LOCK_FILE = Path(".dvc") / "tmp" / "bertflow-pipeline.lock"
HOLDER_FILE = LOCK_FILE.with_suffix(".holder")  # who holds the lock: filelock owns the lock file's content
BIN = Path(sys.executable).parent
# Task timeouts: a budget counts training time, and start-up, evaluations, checkpoints and saving come on top
# (a busy machine stretches all of it), so a budgeted stage gets twice its budget and half an hour more. A
# stage whose length no clock bounds (a step or epoch budget, or none) gets the ceiling, which only a hung
# or runaway stage reaches.
BUDGET_FACTOR = 2.0
BUDGET_ALLOWANCE_SECONDS = 1800.0
CEILING_SECONDS = 12 * 3600.0
POOL_WAIT_SECONDS = 3600.0  # a stage on the work pool may wait this long for a worker to take it
KILL_GRACE_SECONDS = 10.0  # from SIGTERM to SIGKILL for a stage's process group that ran past its timeout


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the project's lock."""


class StageFailed(RuntimeError):
    """A stage's command failed; the message carries the stage's own error line."""


class BadInput(StageFailed):
    """The stage's outcome record says bad input or params (exit 2): retrying cannot help."""


# ---------------------------------------------------------------- helpers (no Prefect state)


def command_env(outcomes: Path | None = None) -> dict[str, str]:
    """The environment of the stage commands: this interpreter's scripts first on PATH, where to leave outcomes."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if outcomes is not None:
        env[outcome.ENV] = str(outcomes)
        env[lifeline.ENV] = lifeline.identity()  # the stage dies with this process, even by SIGKILL
    flow_run = prefect_flow_run_id()
    if flow_run:
        env["PREFECT__FLOW_RUN_ID"] = flow_run  # register tags the MLflow run with it
    return env


def stream(args: list[str], root: Path, logger, outcomes: Path | None = None,
           timeout: float | None = None) -> tuple[int, list[str]]:
    """Run a command in ``root``, every output line into the task log; returns (exit code, lines).

    The command never outlives this call: when it is interrupted (Prefect's task timeout, a cancellation)
    the command's process group is ended, and a watchdog ends it ``timeout`` seconds (plus a grace) after
    its start even where Prefect's timeout cannot interrupt a blocking read (a task in a worker thread)."""
    # a stage runs in a process group of its own, which dies with this process (bertflow/lifeline.py)
    process = subprocess.Popen(args, cwd=root, env=command_env(outcomes), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=outcomes is not None)
    watchdog = None
    if timeout is not None:
        watchdog = threading.Timer(timeout + KILL_GRACE_SECONDS, end_process, (process,))
        watchdog.daemon = True
        watchdog.start()
    lines = []
    try:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                logger.info(line)
        return process.wait(), lines
    finally:
        if watchdog is not None:
            watchdog.cancel()
        end_process(process)


def end_process(process: subprocess.Popen) -> None:
    """SIGTERM to the command (its whole process group when it has one of its own), SIGKILL after a grace."""
    if process.poll() is not None:
        return
    own_group = False
    with contextlib.suppress(ProcessLookupError):
        own_group = os.getpgid(process.pid) == process.pid

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig) if own_group else process.send_signal(sig)
    send(signal.SIGTERM)
    try:
        process.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


def dvc_error(lines: list[str]) -> str:
    """DVC's own last ERROR line (a stage that never started leaves no outcome record), else the last line."""
    for line in reversed(lines):
        if line.startswith("ERROR"):
            return line
    return lines[-1] if lines else "no output"


def stage_timeout(stage: str, params) -> float:
    """The task timeout of ``stage``: ``BUDGET_FACTOR`` × its budget + ``BUDGET_ALLOWANCE_SECONDS``, or the
    ceiling when no clock bounds it. pretrain with ``budget_minutes: 20`` → 2 × 1200 + 1800 = 4200 s."""
    budget = params.budget_seconds(stage)
    return CEILING_SECONDS if budget is None else round(BUDGET_FACTOR * budget + BUDGET_ALLOWANCE_SECONDS, 1)


def stage_timeouts(root: Path) -> dict[str, float]:
    """Every stage's timeout from the project's params.yaml."""
    from bertflow.params import load_params

    params = load_params(root / "params.yaml")
    return {stage: stage_timeout(stage, params) for stage in STAGES}


@contextlib.contextmanager
def pipeline_lock(root: Path, wait_seconds: float):
    """One pipeline run per project at a time; a second waits ``wait_seconds``, then is refused naming the holder."""
    from filelock import FileLock, Timeout

    path, holder = root / LOCK_FILE, root / HOLDER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=wait_seconds)
    try:
        lock.acquire(poll_interval=1.0)
    except Timeout:
        who = holder.read_text().strip() if holder.is_file() else ""
        raise PipelineBusy(f"{path}: another pipeline run holds the lock ({who or 'unknown'}); this run stops "
                           "before touching data, dvc.lock or the registry") from None
    try:
        holder.write_text(f"pid {os.getpid()}, flow run {prefect_flow_run_id()}, "
                          f"since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def prepare_params(root: Path, params_file: str | None, overrides: dict[str, Any]) -> experiments.Snapshot | None:
    """Validate the params; for a profile, put the workspace aside and copy the profile onto params.yaml; write
    ``overrides`` into params.yaml. Returns the snapshot to put back after a profile's run (None without one).

    DVC reads params.yaml, so that is where a run's settings must be for the skip logic, dvc.lock and the
    experiment to record them (``--set`` stays there, as ``dvc exp run --set-param`` leaves it; a profile's
    run is put back, as ``dvc exp run --temp`` never touches the workspace).
    """
    from ruamel.yaml import YAML

    from bertflow.params import load_params

    target = root / "params.yaml"
    source = Path(params_file) if params_file else target
    if not source.is_absolute():
        source = root / source
    load_params(source, overrides)  # raises ParamsError naming every bad key, before anything changes
    profile = source.resolve() != target.resolve()
    if not profile and not overrides:
        return None
    snapshot = experiments.take_snapshot(root) if profile else None
    yaml = YAML()
    data = yaml.load(source.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    tmp = target.with_suffix(".yaml.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        yaml.dump(data, handle)
    os.replace(tmp, target)
    return snapshot


def read_report(root: Path, name: str) -> dict:
    return tracking.read_report(Paths(root), name)


def summary_markdown(root: Path, outcomes: list[dict], pushed: str, experiment: str = "–") -> str:
    evaluation, registered = read_report(root, "evaluate"), read_report(root, "register")
    test = evaluation.get("test", {})
    rows = [f"| bertflow classifier | {test.get('accuracy', '–')} | {test.get('macro_f1', '–')} |"]
    rows += [f"| baseline: {name} | {value.get('accuracy', '–')} | {value.get('macro_f1', '–')} |"
             for name, value in evaluation.get("baselines", {}).items()]
    registry_ran = any(o["stage"] == "register" and o["ran"] for o in outcomes)
    page, logged = report_links(root)
    lines = [
        "# bertflow pipeline run", "",
        "| stage | status | seconds |", "|---|---|---|",
        *[f"| {o['stage']} | {'ran' if o['ran'] else 'skipped'} | {o['seconds']} |" for o in outcomes], "",
        "## Test figures", "", "| model | accuracy | macro-F1 |", "|---|---|---|", *rows, "",
        "## Registry", "",
        f"- decision: **{registered.get('decision', '–')}** ({registered.get('reason', '–')})"
        + ("" if registry_ran else " — from an earlier run; nothing new was registered"),
        f"- model: `{registered.get('model_uri', '–')}` (aliases: {', '.join(registered.get('aliases', [])) or '–'})",
        f"- fast: {(registered.get('fast') or {}).get('variant') or '–'} "
        f"({(registered.get('fast') or {}).get('reason', '–')})",
        f"- MLflow run: `{registered.get('run_id', '–')}` at {registered.get('tracking_uri', '–')}", "",
        "## Report", "",
        f"- [reports/report.html]({page}); MLflow copy: `{logged}`", "",
        "## Revisions", "",
        f"- git: {tracking.git_revision(root)}",
        f"- dvc.lock md5: `{tracking.lock_digest(root)}`",
        f"- DVC remote: {pushed}",
        f"- DVC experiment: {experiment}", "",
    ]
    return "\n".join(lines)


def report_links(root: Path) -> tuple[str, str]:
    """(the page on this machine as a file: URI, where the MLflow run keeps it or why it does not)."""
    logged = read_report(root, "report").get("mlflow", {})
    where = logged.get("artifact_uri") or f"not in MLflow ({logged.get('why', 'the report stage has not run')})"
    return (root / "reports" / "report.html").resolve().as_uri(), where


def link_report(root: Path) -> None:
    """The run report as a Prefect link artifact (the page and its MLflow copy)."""
    page, logged = report_links(root)
    if (root / "reports" / "report.html").is_file():
        create_link_artifact(key="bertflow-report", link=page, link_text="bertflow run report (reports/report.html)",
                             description=f"One self-contained page of this run; MLflow copy: {logged}")


# ---------------------------------------------------------------- tasks


def retry_unless_bad_input(task, task_run, state) -> bool:
    try:
        state.result()
    except (BadInput, TimeoutError):  # a stage past twice its budget would run past it again
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


@task(cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_input)
def run_stage(stage: str, root: str, timeout: float | None = None) -> dict:
    """One stage through DVC: skipped when its deps, params and outs are unchanged.

    Whether it ran is read from dvc.lock (its entry changes exactly when DVC ran or restored it), and
    how it failed from the outcome record ``bertflow <stage>`` leaves (bertflow/outcome.py), not from
    the wording of either tool's output. ``timeout`` is the task's own (``stage_timeout``): the stage's
    processes end with it.
    """
    logger = get_run_logger()
    project, started = Path(root), time.perf_counter()
    folder = outcomes_folder(project)
    before = lock_entry(project, stage)
    try:
        code, lines = stream(["dvc", "repro", "--single-item", stage], project, logger, folder, timeout)
        record = outcome.read_outcome(folder, stage)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if code != 0 and timeout is not None and time.perf_counter() - started >= timeout:
        raise TimeoutError(f"stage {stage} ran past its timeout of {timeout:g} s (stage_timeout: its budget in "
                           "params.yaml) and was stopped")
    if code != 0:
        raise stage_failure(stage, record, lines)
    ran = lock_entry(project, stage) != before
    logger.info("stage %s %s", stage, "ran" if ran else "skipped (nothing changed)")
    return {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - started, 1)}


def outcomes_folder(root: Path) -> Path:
    """A fresh folder for this task's outcome records (under .dvc/tmp, which git and DVC ignore)."""
    import tempfile

    base = root / ".dvc" / "tmp" / "bertflow-outcomes"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base))


def stage_failure(stage: str, record: dict | None, lines: list[str]) -> StageFailed:
    """The failure the stage's outcome record describes (its whole message); DVC's error when it never ran."""
    if record is None:
        return StageFailed(f"stage {stage} failed before it could report: {dvc_error(lines)}")
    failure = BadInput if record["status"] == outcome.BAD_INPUT else StageFailed
    return failure(f"stage {stage} failed ({record['status']}, exit {record['exit_code']}): {record['message']}")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def sync_dvc(root: str) -> None:
    code, lines = stream(["bertflow", "sync-dvc"], Path(root), get_run_logger())
    if code != 0:
        raise StageFailed(f"bertflow sync-dvc failed: {lines[-1] if lines else 'no output'}")
    warn_unversioned(Path(root), get_run_logger())


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[10, 30, 60])
def push_outputs(root: str) -> str:
    """``dvc push`` to the default remote; without one, says so (the outputs stay in the local cache)."""
    logger = get_run_logger()
    remote = subprocess.run(["dvc", "remote", "default"], cwd=root, capture_output=True, text=True,
                            env=command_env()).stdout.strip()
    if not remote:
        logger.warning("no default DVC remote: outputs stay in the local cache (dvc remote add -d ...)")
        return "none configured"
    code, lines = stream(["dvc", "push"], Path(root), logger)
    if code != 0:
        raise StageFailed(f"dvc push to remote {remote!r} failed: {dvc_error(lines)}")
    return remote


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def record_lock(root: str) -> None:
    """Log the run's final dvc.lock (with register's and report's entries) to the MLflow run that registered the
    model, for the record. ``bertflow restore`` does not need it: it reads ``restore/dvc.lock``, which register
    itself recorded, so a version built by ``dvc repro`` restores as well."""
    from mlflow import MlflowClient

    from bertflow.params import load_params
    registered = read_report(Path(root), "register")
    settings = load_params(Path(root) / "params.yaml").register
    uri = tracking.tracking_uri(settings.tracking_uri, Paths(Path(root)))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.log_artifact(registered["run_id"], str(Path(root) / "dvc.lock"))
    client.set_tag(registered["run_id"], "dvc_lock_md5", tracking.lock_digest(Path(root)))


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def update_inputs(root: str) -> None:
    """``dvc update`` the raw inputs imported under data/raw, before params.yaml is read (it names the copies): a
    changed source is imported anew, so ingest re-runs; a missing copy is imported, or pulled when its source
    is gone."""
    logger = get_run_logger()
    for line in experiments.update_inputs(Path(root)):
        logger.info(line)


def warn_unversioned(root: Path, logger) -> None:
    """Name the sources outside the project that are not imported: DVC hashes them but cannot bring them back."""
    from bertflow.dvc_sync import unversioned_inputs
    from bertflow.params import load_params

    outside = unversioned_inputs(load_params(root / "params.yaml").ingest, root)
    if outside:
        logger.warning("raw inputs outside the project, hashed but not versioned by DVC (a restored run cannot get "
                       "them back): %s; `dvc import-url <source> data/raw/<name>` and point params.yaml at the "
                       "copy", ", ".join(outside))


@task(cache_policy=NO_CACHE)
def save_experiment(root: str, name: str, registered: bool) -> str:
    """``dvc exp save`` of the workspace as experiment ``name``; tags the MLflow run that registered the model in
    this run with the experiment's name and commit. Without a git commit to build on there is no experiment."""
    logger, project = get_run_logger(), Path(root)
    if not experiments.has_commit(project):
        logger.warning("%s is not a git work tree with a commit: the run is not saved as a DVC experiment", project)
        return "none (no git commit)"
    commit = experiments.save(project, name)
    logger.info("DVC experiment %s (%s): dvc exp show, dvc exp apply %s", name, commit, name)
    if registered:
        from mlflow import MlflowClient

        from bertflow.params import load_params
        run_id = read_report(project, "register")["run_id"]
        uri = tracking.tracking_uri(load_params(project / "params.yaml").register.tracking_uri, Paths(project))
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.set_tag(run_id, "dvc_exp_name", name)
        client.set_tag(run_id, "dvc_exp_ref", commit)
    return f"{name} ({commit[:10]})"


@contextlib.contextmanager
def experiment_env(name: str):
    """``DVC_EXP_NAME`` for the stage commands while the flow runs (as ``dvc exp run`` sets it); restored after."""
    before = os.environ.get(experiments.ENV)
    os.environ[experiments.ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(experiments.ENV, None)
        else:
            os.environ[experiments.ENV] = before


def unchanged_stages(root: Path, logger) -> set[str]:
    """The stages ``dvc status`` finds unchanged (deps, params, outs and command as dvc.lock has them);
    none when it cannot tell, so that every stage then goes through ``dvc repro``."""
    result = subprocess.run(["dvc", "status", "--json"], cwd=root, env=command_env(), capture_output=True,
                            text=True)
    try:
        changed = json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        changed = None
    if not isinstance(changed, dict):
        logger.warning("dvc status failed (exit %s): every stage goes through dvc repro: %s", result.returncode,
                       (result.stderr or result.stdout).strip()[-500:])
        return set()
    return set(STAGES) - set(changed)


@task(cache_policy=NO_CACHE)
def announce_registration(root: str, before: dict) -> list[str]:
    """The events of what register made (flows/publish.py): ``bertflow.model.registered``, and
    ``bertflow.model.promoted`` for a new champion; none when its record names the version it named before."""
    emitted = publish.emit_model_events(read_report(Path(root), "register"), before)
    get_run_logger().info("events: %s", ", ".join(emitted) or "none (no new version)")
    return emitted


@task(cache_policy=NO_CACHE)
def skip_stage(stage: str) -> dict:
    """A stage ``dvc status`` found unchanged, with nothing before it run in this flow run: no ``dvc repro``."""
    get_run_logger().info("stage %s skipped (nothing changed: dvc status)", stage)
    return {"stage": stage, "ran": False, "seconds": 0.0}


def lock_entry(root: Path, stage: str) -> str:
    """The stage's record in dvc.lock (changes exactly when DVC ran it)."""
    import yaml

    lock = root / "dvc.lock"
    stages = yaml.safe_load(lock.read_text()).get("stages", {}) if lock.is_file() else {}
    return repr(stages.get(stage))


@task(cache_policy=NO_CACHE)
def run_on_pool(stage: str, root: str, deployment: str, timeout: float | None = None) -> dict:
    """Hand one stage to the training work pool and wait for it, at most ``timeout`` seconds (the flow run
    there is then cancelled); the worker's own run of the stage has the stage's timeout too."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    before, started = lock_entry(Path(root), stage), time.perf_counter()
    name = f"{STAGE_FLOW}/{deployment}"
    logger.info("stage %s: handed to deployment %s", stage, name)
    flow_run = run_deployment(name, parameters={"stage": stage, "root": root}, timeout=timeout)
    if not flow_run.state.is_final():
        cancel_flow_run(flow_run.id)
        raise TimeoutError(f"stage {stage} on deployment {name}: flow run {flow_run.name} did not end within "
                           f"{timeout:g} s (its timeout and the wait for a worker); it was cancelled")
    if not flow_run.state.is_completed():
        raise StageFailed(f"stage {stage} on deployment {name}: flow run {flow_run.name} ended "
                          f"{flow_run.state.name}: {flow_run.state.message}")
    ran = lock_entry(Path(root), stage) != before
    logger.info("stage %s %s on the work pool (flow run %s)", stage, "ran" if ran else "skipped", flow_run.name)
    return {"stage": stage, "ran": ran, "seconds": round(time.perf_counter() - started, 1), "flow_run": flow_run.name}


def cancel_flow_run(flow_run_id) -> None:
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="the bertflow pipeline stopped waiting for it"),
                                  force=True)


@flow(name=STAGE_FLOW, log_prints=True)
def stage_flow(stage: str, root: str) -> dict:
    """One stage, on whichever worker of the training pool picked it up: the same ``dvc repro``, with the same
    timeout (from the project's params.yaml)."""
    if stage not in POOLED:
        raise ValueError(f"{stage}: only {', '.join(POOLED)} run on a training work pool")
    timeout = stage_timeouts(Path(root))[stage]
    return run_stage.with_options(name=stage, timeout_seconds=timeout)(stage, root, timeout)


def run_one(stage: str, root: str, work_pool: str | None, deployment: str, timeout: float) -> dict:
    """A stage here, or on the training work pool when params name one and the stage is a training stage."""
    if work_pool and stage in POOLED:
        waited = timeout + POOL_WAIT_SECONDS
        return run_on_pool.with_options(name=f"{stage}@{work_pool}", timeout_seconds=waited + KILL_GRACE_SECONDS)(
            stage, root, deployment, waited)
    return run_stage.with_options(name=stage, retries=RETRIED.get(stage, 0), retry_delay_seconds=15,
                                  timeout_seconds=timeout)(stage, root, timeout)


# ---------------------------------------------------------------- the flow


@flow(name="bertflow", log_prints=True)
def pipeline(root: str = ".", params_file: str | None = None, overrides: dict[str, Any] | None = None,
             lock_wait_seconds: float = 0.0, experiment: str | None = None) -> list[dict]:
    """Run the pipeline on the project at ``root`` (the folder with dvc.yaml and params.yaml) as DVC experiment
    ``experiment`` (default ``flow-<UTC time>``); ``params_file``: a profile for this run only."""
    project = Path(root).resolve()
    name = experiment or experiments.experiment_name()
    with pipeline_lock(project, lock_wait_seconds), experiment_env(name):
        update_inputs(str(project))
        snapshot = prepare_params(project, params_file, overrides or {})
        try:
            sync_dvc(str(project))
            placement, timeouts = training_placement(project), stage_timeouts(project)
            unchanged = unchanged_stages(project, get_run_logger())
            registered_before = read_report(project, "register")  # the events name only a version new since
            outcomes = []
            for stage in STAGES:  # from the first stage that runs on, DVC decides each stage afresh
                if stage in unchanged and not any(o["ran"] for o in outcomes):
                    outcomes.append(skip_stage.with_options(name=stage)(stage))
                    continue
                outcomes.append(run_one(stage, str(project), *placement, timeouts[stage]))
                if stage == "register" and outcomes[-1]["ran"]:
                    announce_registration(str(project), registered_before)
            pushed = push_outputs(str(project))
            registered = any(o["stage"] == "register" and o["ran"] for o in outcomes)
            if registered:
                record_lock(str(project))
            saved = save_experiment(str(project), name, registered)
            create_markdown_artifact(key="bertflow-run-summary",
                                     markdown=summary_markdown(project, outcomes, pushed, saved),
                                     description="bertflow pipeline run: stages, figures, registry decision, revisions")
            publish.create_tables(outcomes, read_report(project, "optimize"), read_report(project, "register"))
            link_report(project)
        finally:
            if snapshot is not None:
                for line in experiments.put_back(project, snapshot):
                    get_run_logger().info(line)
    return outcomes


# ---------------------------------------------------------------- command line


def parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. finetune.learning_rate=5e-5")
        overrides[key] = yaml.safe_load(value)
    return overrides


def training_placement(root: Path) -> tuple[str | None, str]:
    """(work pool, deployment) of the training stages from params.yaml; no pool: they run here."""
    from bertflow.params import load_params

    settings = load_params(root / "params.yaml").distributed
    return settings.work_pool, settings.deployment


def parse_job_variables(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as Prefect's own ``--job-variable`` reads them: VALUE as JSON, else as a string.

    >>> parse_job_variables(['volumes=["/srv/p:/srv/p"]', "network_mode=host"])
    {'volumes': ['/srv/p:/srv/p'], 'network_mode': 'host'}
    """
    variables = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bertflow-flow: error: --job-variable {item!r}: expected KEY=VALUE, e.g. "
                             "'volumes=[\"/srv/bertflow:/srv/bertflow\"]'")
        try:
            variables[key] = json.loads(value)
        except ValueError:
            variables[key] = value
    return variables


def deploy_training(root: Path, image: str | None = None, job_variables: dict[str, Any] | None = None) -> str:
    """Create (or update) the stage deployment on ``distributed.work_pool``; returns its name.

    ``image`` (a Docker, Kubernetes, ... pool: the image its jobs run, used as it is, neither built nor pushed)
    and ``job_variables`` (the pool's base job template's variables: volumes, env, ...) are stored with the
    deployment; the stage flow runs from ``root`` (the project, which a container sees through a volume)."""
    work_pool, deployment = training_placement(root)
    if not work_pool:
        raise SystemExit("bertflow-flow: error: params.yaml has no distributed.work_pool to deploy to")
    source = stage_flow.from_source(source=str(root), entrypoint="flows/pipeline.py:stage_flow")
    try:
        source.deploy(name=deployment, work_pool_name=work_pool, image=image, build=False, push=False,
                      job_variables=job_variables or {}, tags=["bertflow"], print_next_steps=False,
                      description="one bertflow training stage (dvc repro --single-item) on a training worker")
    except ValueError as error:  # no such pool; an image for a pool without one (a process pool)
        raise SystemExit(f"bertflow-flow: error: work pool {work_pool!r} (distributed.work_pool): {error}") from None
    return f"{STAGE_FLOW}/{deployment}"


def settings_note(root: Path, cwd: Path) -> str | None:
    """Why ``root``'s prefect.toml is not in effect, when it is not: Prefect reads the working directory's."""
    if (root / "prefect.toml").is_file() and root.resolve() != cwd.resolve():
        return (f"bertflow-flow: note: {root / 'prefect.toml'} is not read: Prefect reads prefect.toml from the "
                f"working directory ({cwd}); run from {root} to use it")
    return None


def serve(root: Path) -> None:
    """Serve the flow as a deployment on the cron schedule in params.yaml's ``schedule`` section."""
    from prefect.schedules import Cron

    from bertflow.params import load_params

    schedule = load_params(root / "params.yaml").schedule
    pipeline.serve(name=schedule.deployment, schedule=Cron(schedule.cron, timezone=schedule.timezone),
                   parameters={"root": str(root), "lock_wait_seconds": schedule.lock_wait_seconds},
                   global_limit=1, tags=["bertflow"],
                   description="bertflow: corpus → tokenizer → pretraining → fine-tuning → evaluation → registry")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bertflow-flow", description="the bertflow pipeline as a Prefect flow")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline once, now")
    run.add_argument("--root", default=".")
    run.add_argument("--profile", "--params", dest="profile", default=None, metavar="FILE",
                     help="a params profile (params.tiny.yaml, params.zh.yaml, ...) for this run only: it runs as its "
                          "own DVC experiment and the workspace (params.yaml included) is put back afterwards")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one param, written into params.yaml as `dvc exp run -S` does")
    run.add_argument("--name", default=None, help="the DVC experiment's name (default flow-<UTC time>)")
    served = commands.add_parser("serve", help="serve a deployment on params.yaml's schedule (blocks)")
    served.add_argument("--root", default=".")
    deployed = commands.add_parser("deploy-training", help="deploy the training stages to distributed.work_pool")
    deployed.add_argument("--root", default=".")
    deployed.add_argument("--image", default=None, help="the image of a Docker/Kubernetes pool's jobs (not built)")
    deployed.add_argument("--job-variable", action="append", default=[], metavar="KEY=VALUE", dest="job_variables",
                          help="a job variable of the pool (VALUE as JSON, else a string), e.g. "
                               "'volumes=[\"/srv/bertflow:/srv/bertflow\"]'")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    note = settings_note(root, Path.cwd())
    if note:
        print(note, file=sys.stderr)
    if shutil.which("dvc", path=str(BIN)) is None and shutil.which("dvc") is None:
        print("bertflow-flow: error: dvc is not installed", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(root)
        return 0
    if args.command == "deploy-training":
        print(deploy_training(root, args.image, parse_job_variables(args.job_variables)))
        return 0
    state = pipeline(root=str(root), params_file=args.profile, overrides=parse_overrides(args.set),
                     experiment=args.name, return_state=True)
    if not state.is_completed():
        print(f"bertflow-flow: error: the flow run ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    print(stage_table(state.result()))
    print(closing_text(root, state.result()))  # the figures, the registry decision, the report's path
    return 0


def stage_table(outcomes: list[dict]) -> str:
    """What ran and how long each stage took, for the terminal."""
    lines = [f"{'stage':<14} {'status':<8} {'seconds':>8}"]
    lines += [f"{o['stage']:<14} {'ran' if o['ran'] else 'skipped':<8} {o['seconds']:>8}" for o in outcomes]
    lines.append(f"{'total':<14} {'':<8} {sum(o['seconds'] for o in outcomes):>8.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
