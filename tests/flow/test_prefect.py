"""The Prefect flow with real Prefect, DVC and MLflow: one record with dvc repro, failures, the lock, a schedule."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from tests.flow.conftest import (
    BIN,
    api_call,
    api_env,
    background,
    classifier_versions,
    mlflow_client,
    repro,
    set_param,
    set_params,
    sh,
    stop,
)

STAGES = ["ingest", "tokenizer", "lm_baselines", "pretrain_data", "pretrain", "finetune", "evaluate", "attention",
          "optimize", "register", "report"]
AFTER_EVALUATE = ["evaluate", "register", "report"]  # what a change to evaluate's params re-runs


def flow_state(project: Path, **kwargs):
    from flows.pipeline import pipeline

    return pipeline(root=str(project), return_state=True, **kwargs)


def ran(state) -> list[str]:
    return [o["stage"] for o in state.result() if o["ran"]]


def flow_logs(state, *expected: str, seconds: float = 60) -> str:
    """The flow run's logs as the API has them; Prefect ships logs in batches, so wait for ``expected``."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.time() + seconds
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        text = "\n".join(log.message for log in logs)
        if all(e in text for e in expected) or time.time() > deadline:
            return text
        time.sleep(1)


def summary(state, key: str = "bertflow-run-summary"):
    """The flow run's artifact ``key``: the summary's markdown, or the report link artifact."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (artifact,) = [a for a in artifacts if a.key == key]
    return artifact if key != "bertflow-run-summary" else artifact.data


def test_flow_and_dvc_repro_keep_one_record(built, prefect_api, monkeypatch):
    project = built  # the session's chain, built by dvc repro: the flow skips it all
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ran(flow_state(project)) == []
    set_param(project, "pretrain", "seed", 7)  # pretraining and everything after it run under the flow
    set_params(project, [("finetune", "random_init_ablation", False), ("evaluate", "majority_baseline", False),
                         ("optimize", "variants", ["int8"])])  # parts of stages that re-run anyway, not looked at
    first = flow_state(project)
    assert first.is_completed(), first.message
    assert ran(first) == STAGES[STAGES.index("pretrain"):]
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert repro(project, "report") == []  # after a flow run, dvc repro does nothing

    from flows.pipeline import stage_table

    table = stage_table(first.result()).splitlines()  # what `bertflow-flow run` prints at the end
    assert [line.split()[:2] for line in table[1:-1]] == [
        [stage, "ran" if stage in STAGES[STAGES.index("pretrain"):] else "skipped"] for stage in STAGES]
    text = summary(first)
    version = json.loads((project / "reports" / "register.json").read_text())["version"]
    assert int(version) > 1 and f"models:/tiny/{version}" in text  # a new version beside the built one
    assert "| finetune | ran |" in text and "baseline: tfidf_logreg" in text
    assert "dvc.lock md5" in text and "git:" in text
    report_link = summary(first, "bertflow-report")  # the run report, linked from the flow run
    assert report_link.type == "markdown" and (project / "reports" / "report.html").as_uri() in report_link.data
    assert "runs:/" in report_link.description and "report.html" in text
    page = (project / "reports" / "report.html").read_text(encoding="utf-8")
    assert str(first.state_details.flow_run_id) in page  # lineage names the Prefect flow run
    logs = flow_logs(first, "tokens/s")
    assert "tokens/s" in logs and "loss" in logs  # training progress reaches the task logs

    registered = json.loads((project / "reports" / "register.json").read_text())
    client = mlflow_client(project)
    run = client.get_run(registered["run_id"])
    assert run.data.tags["prefect_flow_run_id"] == str(first.state_details.flow_run_id)
    assert run.data.tags["dvc_lock_md5"] and "dvc.lock" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any((project.parent / "remote").rglob("*")), "outputs were not pushed to the DVC remote"
    assert "up to date" in sh("dvc", "status", "--cloud", cwd=project).stdout.lower() or \
        "cache and remote" in sh("dvc", "status", "--cloud", cwd=project).stdout.lower()
    assert ran(flow_state(project)) == []  # unchanged: every stage skipped


def test_failed_stage_fails_the_run_and_the_next_run_resumes_there(built, prefect_api, monkeypatch):
    project = built  # the whole chain already built by dvc repro: the flow's first run skips every stage
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert flow_state(project).is_completed()

    # unreadable data: the run fails at ingest with ingest's own message, and retries no bad input
    (project / "corpus" / "bad.txt").write_bytes(b"caf\xe9 au lait, " * 20)
    sh("bertflow", "sync-dvc", cwd=project)
    failed = flow_state(project)
    assert failed.is_failed()
    logs = flow_logs(failed, "bertflow ingest: error:", "Finished in state Failed")
    assert "bertflow ingest: error:" in logs and "not valid UTF-8" in logs
    assert logs.count("Running stage 'ingest'") == 1  # bad input is not retried
    assert (project / "artifacts" / "classifier" / "config.json").is_file()  # what was built is kept
    (project / "corpus" / "bad.txt").unlink()
    sh("bertflow", "sync-dvc", cwd=project)

    # a registry that does not answer: the stages before register keep their outputs in the cache,
    # and once it is back the next run runs register (and the report that follows it) alone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    down = flow_state(project, overrides={"evaluate.heldout_instances": 7})  # evaluate, then register
    assert down.is_failed()
    assert "MLflow registry at http://127.0.0.1:" in flow_logs(down, "MLflow registry at")
    status = sh("dvc", "status", cwd=project).stdout
    assert "register:" in status and "evaluate:" not in status  # evaluate's run is kept
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    resumed = flow_state(project)
    assert resumed.is_completed() and ran(resumed) == ["register", "report"]


def test_a_second_run_at_once_is_refused(project, prefect_api):
    from flows.pipeline import pipeline_lock

    with pipeline_lock(project, 0):
        state = flow_state(project)
    assert state.is_failed()
    with pytest.raises(Exception, match="another pipeline run holds the lock"):
        state.result()
    assert not (project / "data").exists() and not (project / "dvc.lock").exists()


# ---------------------------------------------------------------- a served deployment on a real server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


READ_LOGS = """
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
with get_client(sync_client=True) as client:
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[sys.argv[1]])))
print(json.dumps("\\n".join(l.message for l in logs)))
"""
RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=900)
print(json.dumps({"state": run.state.type.value, "id": str(run.id)}))
"""


def run_logs(env: dict, run_id: str) -> str:
    """The run's log lines the server has so far (the runner ships them in batches, after the state)."""
    return json.loads(api_call(READ_LOGS, env, run_id))


DEPLOYMENT = """
import sys
from prefect import get_client
with get_client(sync_client=True) as client:
    d = client.read_deployment_by_name(sys.argv[1])
    print([s.schedule.cron + " " + s.schedule.timezone for s in d.schedules])
"""


def stage_lines(env: dict, run_id: str, count: int) -> dict[str, str]:
    """``stage -> ran | skipped`` from the run's ``stage <name> ...`` log lines, once all ``count`` are in."""
    def lines():
        found = {}
        for line in run_logs(env, run_id).splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "stage" and words[1] in STAGES and words[2] in ("ran", "skipped"):
                found[words[1]] = words[2]
        return found if len(found) == count else None
    try:
        return wait_for(lines, 60, f"{count} 'stage ... ran/skipped' lines in the run's logs")
    except AssertionError:
        shown = [line for line in run_logs(env, run_id).splitlines() if line.startswith("stage ")]
        raise AssertionError(f"the run's stage lines: {shown}") from None


def test_served_deployment_and_dvc_repro_keep_one_record(built, prefect_api, tmp_path):
    """``dvc repro``, then the served deployment through the API: it skips what dvc repro built, then
    runs a flow-run override (written to params.yaml, so dvc repro agrees) and registers it.

    The changes are evaluate's (evaluate, register and report re-run): what the deployment runs is the
    same flow whichever stage a change reaches, and test_flow_and_dvc_repro_keep_one_record runs training
    under the flow."""
    # heldout_instances re-runs evaluate onward; the baselines and the report's logging: not looked at here
    project = set_params(built, [("evaluate", "heldout_instances", 7), ("evaluate", "majority_baseline", False),
                                 ("evaluate", "tfidf_baseline", False), ("report", "log_to_mlflow", False)])
    assert repro(project, "report") == AFTER_EVALUATE
    lock = (project / "dvc.lock").read_text()
    env = api_env(prefect_api, tmp_path)
    served = background([str(BIN / "bertflow-flow"), "serve", "--root", str(project)], project, env,
                        tmp_path / "serve.log")
    try:
        def deployed():
            assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return api_call(DEPLOYMENT, env, "bertflow/tiny-nightly")
            except AssertionError:
                return False
        assert wait_for(deployed, 180, "the deployment") == "['0 3 * * * Europe/Berlin']"

        # after dvc repro, the served flow skips every stage and registers nothing
        skipped = json.loads(api_call(RUN_DEPLOYMENT, env, "bertflow/tiny-nightly", "{}"))
        assert skipped["state"] == "COMPLETED", run_logs(env, skipped["id"])[-3000:]
        assert stage_lines(env, skipped["id"], len(STAGES)) == {stage: "skipped" for stage in STAGES}
        assert (project / "dvc.lock").read_text() == lock
        assert len(classifier_versions(project)) == 2  # the built project's and dvc repro's

        # a flow-run override: evaluate onward runs on the served deployment and registers
        parameters = json.dumps({"overrides": {"evaluate.heldout_instances": 5}})
        changed = json.loads(api_call(RUN_DEPLOYMENT, env, "bertflow/tiny-nightly", parameters))
        assert changed["state"] == "COMPLETED", run_logs(env, changed["id"])[-3000:]
        assert stage_lines(env, changed["id"], len(STAGES)) == {
            stage: "ran" if stage in AFTER_EVALUATE else "skipped" for stage in STAGES}
    finally:
        stop(served)
    assert yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["heldout_instances"] == 5
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    version = json.loads((project / "reports" / "register.json").read_text())["version"]
    versions = classifier_versions(project)  # the built project's, dvc repro's and the served run's
    assert len(versions) == 3 and versions[-1] == int(version)


def test_the_flow_skips_from_dvc_status_only_what_it_calls_unchanged(built, tmp_path):
    """The up-front ``dvc status``: every stage of the built project unchanged; a changed param takes its
    stage out (the stages after it are dvc repro's once it has run); a status that fails (no DVC project)
    calls nothing unchanged, leaving every stage to dvc repro."""
    import logging

    from flows.pipeline import unchanged_stages

    warnings = []
    logger = logging.getLogger("tests.flow.status")
    logger.addHandler(type("Kept", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
    assert unchanged_stages(built, logger) == set(STAGES)
    set_param(built, "evaluate", "heldout_instances", 7)
    assert unchanged_stages(built, logger) == set(STAGES) - {"evaluate"}  # downstream is DVC's, later
    (tmp_path / "no-dvc").mkdir()
    assert unchanged_stages(tmp_path / "no-dvc", logger) == set()
    assert len(warnings) == 1 and warnings[0].startswith("dvc status failed")


# ---------------------------------------------------------------- settings, timeouts, the lock (issue 21, point 7)


def test_prefect_settings_come_from_prefect_toml_not_the_flow_module(project):
    """Prefect reads the project's prefect.toml in a process started there; importing the flow module writes
    nothing into the environment."""
    env = {k: v for k, v in api_env("http://127.0.0.1:9/api", project.parent).items()
           if not k.startswith("PREFECT_SERVER_")}
    shown = sh(str(BIN / "prefect"), "config", "view", "--show-sources", cwd=project, env=env).stdout
    assert "PREFECT_SERVER_DATABASE_TIMEOUT='60' (from prefect.toml)" in shown
    assert "PREFECT_SERVER_ANALYTICS_ENABLED='False' (from prefect.toml)" in shown
    written = api_call("import os; before = dict(os.environ); import flows.pipeline; "
                       "print(sorted(k for k in os.environ if os.environ[k] != before.get(k)))", env)
    assert written == "[]"

    from flows.pipeline import settings_note

    assert settings_note(project, project) is None
    assert "is not read: Prefect reads prefect.toml from the working directory" in settings_note(project, BIN)


def params_with(tmp_path: Path, overrides: dict):
    from bertflow.params import load_params
    from tests.conftest import tiny_params, write_params

    return load_params(write_params(tmp_path, tiny_params(tmp_path)), overrides)


def test_stage_timeouts_are_derived_from_the_budgets(tmp_path):
    from flows.pipeline import CEILING_SECONDS, stage_timeout
    from tasks.finetune import planned_runs

    minutes = {"pretrain.max_steps": None, "pretrain.budget_minutes": 20, "finetune.budget_minutes": 30,
               "finetune.seeds": 2, "lm_baselines.lstm.max_steps": None, "lm_baselines.lstm.budget_minutes": 5}
    params = params_with(tmp_path, minutes)
    assert stage_timeout("pretrain", params) == 2 * 1200 + 1800  # twice the budget and half an hour
    assert stage_timeout("finetune", params) == 2 * 4 * 1800 + 1800  # 2 seeds × (classifier + random-init twin)
    assert stage_timeout("lm_baselines", params) == 2 * 300 + 1800
    assert stage_timeout("evaluate", params) == CEILING_SECONDS  # no budget: the ceiling
    no_ablation = params_with(tmp_path, {**minutes, "finetune.random_init_ablation": False, "finetune.seeds": 1})
    assert stage_timeout("finetune", no_ablation) == 2 * 1800 + 1800
    steps = params_with(tmp_path, {"lm_baselines.lstm.enabled": False})  # the tiny profile: steps and epochs
    assert {stage_timeout(s, steps) for s in ("pretrain", "finetune", "lm_baselines")} == {CEILING_SECONDS}
    for seeds, ablation in [(1, True), (3, True), (2, False)]:  # the count finetune itself plans
        settings = params_with(tmp_path, {"finetune.seeds": seeds, "finetune.random_init_ablation": ablation})
        assert settings.finetune.run_count == len(planned_runs(settings.finetune))


def stage_processes(project: Path, stage: str) -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        command = process.info["cmdline"] or []
        if stage in command and process.info["cwd"] == str(project):
            found.append(process.pid)
    return found


def test_a_stage_past_its_timeout_is_stopped(built, prefect_api, monkeypatch):
    """The derived timeout is the stage task's: an LSTM budget of 1.2 s (factor 1, no allowance) stops
    lm_baselines, the task run ends TimedOut, the stage's processes are gone and DVC recorded nothing."""
    import flows.pipeline as pipeline

    monkeypatch.setattr(pipeline, "BUDGET_FACTOR", 1.0)
    monkeypatch.setattr(pipeline, "BUDGET_ALLOWANCE_SECONDS", 0.0)
    monkeypatch.setattr(pipeline, "KILL_GRACE_SECONDS", 2.0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = set_params(built, [("lm_baselines", "lstm.max_steps", None),
                                 ("lm_baselines", "lstm.budget_minutes", 0.02)])
    sh("bertflow", "sync-dvc", cwd=project)
    lock = (project / "dvc.lock").read_text()
    started = time.time()
    state = flow_state(project)
    assert state.is_failed()
    assert time.time() - started < 120
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            state.state_details.flow_run_id])))
    states = {run.name.rsplit("-", 1)[0]: run.state for run in runs}
    assert states["lm_baselines"].name == "TimedOut", states["lm_baselines"]
    assert "exceeded timeout of 1.2 second" in states["lm_baselines"].message
    assert "tokenizer" in states and "pretrain_data" not in states  # the run stopped there
    assert stage_processes(project, "lm_baselines") == []
    assert (project / "dvc.lock").read_text() == lock
    assert "lm_baselines:" in sh("dvc", "status", cwd=project).stdout  # still to run, and DVC's lock is free


HOLD_LOCK = """
import sys, time
from pathlib import Path
from flows.pipeline import pipeline_lock
with pipeline_lock(Path(sys.argv[1]), 0):
    print("held", flush=True)
    time.sleep(300)
"""


def test_the_lock_names_its_holder_and_waits_for_it(tmp_path):
    """A second process holds the lock: a run is refused at once naming it, or after waiting; once the holder
    is killed (no release), the lock is free."""
    import signal
    import subprocess

    from flows.pipeline import HOLDER_FILE, PipelineBusy, pipeline_lock

    holder = subprocess.Popen([str(BIN / "python"), "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineBusy, match=rf"another pipeline run holds the lock \(pid {holder.pid}, "):
            with pipeline_lock(tmp_path, 0):
                pass
        started = time.monotonic()
        with pytest.raises(PipelineBusy, match=f"pid {holder.pid}"):
            with pipeline_lock(tmp_path, 2):
                pass
        assert time.monotonic() - started >= 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pipeline_lock(tmp_path, 5):
        assert (tmp_path / HOLDER_FILE).read_text().startswith(f"pid {__import__('os').getpid()}, ")
    assert not (tmp_path / HOLDER_FILE).exists()


# ---------------------------------------------------------------- the training deployment on any pool (point 9)

DEPLOYED = """
import json, sys
from prefect import get_client
with get_client(sync_client=True) as client:
    d = client.read_deployment_by_name(sys.argv[1])
    print(json.dumps({"pool": d.work_pool_name, "job_variables": d.job_variables, "pull_steps": d.pull_steps}))
"""


def test_deploy_training_stores_image_and_job_variables(project, prefect_api, tmp_path):
    """A Docker pool (made on the real server; no Docker daemon is needed to deploy to it): the image and the
    job variables (the shared volume, the network, the environment) are the deployment's; the stage flow runs
    from the project folder. An image for a process pool, or a malformed variable, is one clear error."""
    env = api_env(prefect_api, tmp_path)
    sh(str(BIN / "prefect"), "work-pool", "create", "docker-training", "--type", "docker", cwd=project, env=env)
    set_param(project, "distributed", "work_pool", "docker-training")
    set_param(project, "distributed", "deployment", "tiny-docker")
    deploy = [str(BIN / "bertflow-flow"), "deploy-training", "--root", str(project)]
    volume = f"{project}:{project}"
    out = sh(*deploy, "--image", "registry.example/bertflow:1", "--job-variable", f'volumes=["{volume}"]',
             "--job-variable", "network_mode=host", "--job-variable", 'env={"MLFLOW_TRACKING_URI": "http://m:5000"}',
             cwd=project, env=env).stdout
    assert "bertflow-stage/tiny-docker" in out
    stored = json.loads(api_call(DEPLOYED, env, "bertflow-stage/tiny-docker"))
    assert stored["pool"] == "docker-training"
    assert stored["job_variables"] == {"image": "registry.example/bertflow:1", "volumes": [volume],
                                       "network_mode": "host", "env": {"MLFLOW_TRACKING_URI": "http://m:5000"}}
    assert str(project) in json.dumps(stored["pull_steps"])  # the stage flow runs in the project

    sh(str(BIN / "prefect"), "work-pool", "create", "process-training", "--type", "process", cwd=project, env=env)
    set_param(project, "distributed", "work_pool", "process-training")
    refused = sh(*deploy, "--image", "registry.example/bertflow:1", cwd=project, env=env, check=False)
    assert refused.returncode != 0 and "work pool 'process-training' (distributed.work_pool)" in refused.stderr
    malformed = sh(*deploy, "--job-variable", "volumes", cwd=project, env=env, check=False)
    assert malformed.returncode != 0 and "--job-variable 'volumes': expected KEY=VALUE" in malformed.stderr
    sh(*deploy, "--job-variable", 'env={"OMP_NUM_THREADS": "4"}', cwd=project, env=env)  # a process pool's own
    stored = json.loads(api_call(DEPLOYED, env, "bertflow-stage/tiny-docker"))
    assert stored["pool"] == "process-training" and stored["job_variables"] == {"env": {"OMP_NUM_THREADS": "4"}}


def test_a_pooled_stage_no_worker_takes_is_cancelled_at_its_timeout(built, prefect_api, tmp_path, monkeypatch):
    """pretrain handed to a work pool without a worker: the flow waits the stage's timeout (here a 5 s ceiling
    and no extra wait for a worker), cancels the pool's flow run and fails naming the stage."""
    import flows.pipeline as pipeline
    from tests.flow.conftest import pooled_runs

    monkeypatch.setattr(pipeline, "CEILING_SECONDS", 5.0)  # the tiny profile's pretrain has a step budget
    monkeypatch.setattr(pipeline, "POOL_WAIT_SECONDS", 0.0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = api_env(prefect_api, tmp_path)
    sh(str(BIN / "prefect"), "work-pool", "create", "idle-training", "--type", "process", cwd=built, env=env)
    project = set_params(built, [("distributed", "work_pool", "idle-training"),
                                 ("distributed", "deployment", "tiny-idle"), ("pretrain", "seed", 7)])
    sh(str(BIN / "bertflow-flow"), "deploy-training", "--root", str(project), cwd=project, env=env)
    lock = (project / "dvc.lock").read_text()
    state = flow_state(project)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"stage pretrain on deployment bertflow-stage/tiny-idle: .* did not end "
                                        r"within 5 s .* it was cancelled"):
        state.result()
    assert pooled_runs(env, "tiny-idle")[0][1] in ("CANCELLING", "CANCELLED")
    assert (project / "dvc.lock").read_text() == lock


def test_bertflow_flow_run_ends_with_the_stage_table_and_the_three_lines(built, prefect_api, monkeypatch, capsys):
    """What `make run` prints last (issue 21 point 10): the stage table, then the test figures beside the baselines
    with whether pretraining paid, the registry decision with the model URI, and where the report is."""
    from flows.pipeline import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "--root", str(built)]) == 0  # the built chain: every stage skipped
    lines = capsys.readouterr().out.strip().splitlines()
    total = next(i for i, line in enumerate(lines) if line.startswith("total"))
    assert [line.split()[0] for line in lines[total - len(STAGES):total]] == STAGES
    closing = lines[total + 1:]
    registered = json.loads((built / "reports" / "register.json").read_text())
    assert closing[0].startswith("Test accuracy ") and "TF-IDF" in closing[0] and "pretraining" in closing[0].lower()
    assert closing[1].startswith(f"Registry: {registered['model_uri']} registered as {registered['decision']}")
    assert closing[1].endswith("decided by an earlier run: register had nothing new")
    assert closing[2] == f"Report: {(built / 'reports' / 'report.html').resolve()}"
