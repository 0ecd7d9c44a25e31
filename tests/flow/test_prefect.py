"""The Prefect flow with real Prefect, DVC and MLflow: one record with dvc repro, failures, the lock, a schedule."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.flow.conftest import (
    AFTER_FINETUNE_DVC,
    BIN,
    ENV,
    classifier_versions,
    mlflow_client,
    repro,
    set_param,
    sh,
)

STAGES = ["ingest", "tokenizer", "lm_baselines", "pretrain_data", "pretrain", "finetune", "evaluate", "attention",
          "optimize", "register", "report"]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect API (the test harness's temporary server and SQLite database) for in-process flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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


def test_dvc_repro_and_flow_overrides_keep_one_record(built, prefect_api, monkeypatch):
    """The other half of one record (a test of its own, so make test's workers share the halves)."""
    project = built
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow_client(project)
    set_param(project, "finetune", "learning_rate", 0.0005)
    assert repro(project, "report") == AFTER_FINETUNE_DVC
    assert ran(flow_state(project)) == []  # after dvc repro, the flow skips every stage
    changed = flow_state(project, overrides={"finetune.learning_rate": 0.0002})
    assert ran(changed) == ["finetune", "evaluate", "attention", "optimize", "register", "report"]
    assert "learning_rate: 0.0002" in (project / "params.yaml").read_text()
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    versions = client.search_model_versions("name='tiny'")
    # the built project's, dvc repro's and the flow's: the classifier, each beside its variants
    assert sum(v.tags.get("variant") == "fp32" for v in versions) == 3


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
    down = flow_state(project, overrides={"finetune.learning_rate": 0.0003})
    assert down.is_failed()
    assert "MLflow registry at http://127.0.0.1:" in flow_logs(down, "MLflow registry at")
    status = sh("dvc", "status", cwd=project).stdout
    assert "register:" in status and "finetune:" not in status and "optimize:" not in status
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


def api_call(code: str, env: dict, *args: str) -> str:
    result = subprocess.run([str(BIN / "python"), "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


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
run = run_deployment(sys.argv[1], timeout=900)
print(json.dumps({"state": run.state.type.value, "id": str(run.id)}))
"""


def run_logs(env: dict, run_id: str) -> str:
    """The run's log lines the server has so far (the runner ships them in batches, after the state)."""
    return json.loads(api_call(READ_LOGS, env, run_id))


HEALTH = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1] + "/health", timeout=5).read().decode())
"""
DEPLOYMENT = """
import sys
from prefect import get_client
with get_client(sync_client=True) as client:
    d = client.read_deployment_by_name(sys.argv[1])
    print([s.schedule.cron + " " + s.schedule.timezone for s in d.schedules])
"""


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def prefect_server(tmp_path):
    """A real ``prefect server start`` on 127.0.0.1; yields the environment that points at it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_DATABASE_TIMEOUT": "60"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        def healthy():
            try:
                return api_call(HEALTH, env, api) == "true"
            except AssertionError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                return False
        wait_for(healthy, 180, "the Prefect server")
        yield env
    finally:
        stop(server)
        shutil.rmtree(tmp_path / "prefect_home", ignore_errors=True)


def background(command: list[str], cwd, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_served_deployment_runs_through_the_api(built, tmp_path):
    project = built
    set_param(project, "finetune", "learning_rate", 0.0005)  # the served run has stages to run
    with prefect_server(tmp_path) as env:
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

            first = json.loads(api_call(RUN_DEPLOYMENT, env, "bertflow/tiny-nightly"))
            assert first["state"] == "COMPLETED", run_logs(env, first["id"])[-3000:]
            version = json.loads((project / "reports" / "register.json").read_text())["version"]
            assert classifier_versions(project) == [1, int(version)]  # the built project's, and this run's
            lock = (project / "dvc.lock").read_text()

            second = json.loads(api_call(RUN_DEPLOYMENT, env, "bertflow/tiny-nightly"))
            assert second["state"] == "COMPLETED", run_logs(env, second["id"])[-3000:]
            try:
                wait_for(lambda: all(f"stage {stage} skipped" in run_logs(env, second["id"]) for stage in STAGES), 60,
                         "a 'skipped' line for every stage in the second run's logs")
            except AssertionError:
                lines = [line for line in run_logs(env, second["id"]).splitlines() if line.startswith("stage ")]
                raise AssertionError(f"the second run's stage lines: {lines}") from None
            versions = mlflow_client(project).search_model_versions("name='tiny'")
            assert [v.tags.get("variant") for v in versions].count("fp32") == 2  # nothing new registered
            assert (project / "dvc.lock").read_text() == lock
        finally:
            stop(served)


POOL_RUNS = """
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[sys.argv[1]])))
print(json.dumps(sorted([r.parameters["stage"], r.state.type.value] for r in runs)))
"""


def test_training_stages_run_on_a_work_pool(built, tmp_path):
    project = built
    set_param(project, "pretrain", "seed", 7)  # pretrain and finetune run again, on the pool
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distributed"] = {"work_pool": "training", "deployment": "tiny-training"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with prefect_server(tmp_path) as env:
        sh(str(BIN / "prefect"), "work-pool", "create", "training", "--type", "process", cwd=project, env=env)
        deployed = sh(str(BIN / "bertflow-flow"), "deploy-training", "--root", str(project), cwd=project, env=env)
        assert "bertflow-stage/tiny-training" in deployed.stdout
        worker = background([str(BIN / "prefect"), "worker", "start", "--pool", "training"], project, env,
                            tmp_path / "worker.log")
        try:
            run = sh(str(BIN / "bertflow-flow"), "run", "--root", str(project), cwd=project, env=env, check=False)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + \
                (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            stop(worker)
        pooled = json.loads(api_call(POOL_RUNS, env, "tiny-training"))
    assert pooled == [["finetune", "COMPLETED"], ["pretrain", "COMPLETED"]]
    assert "pretrain@training" in run.stdout + run.stderr
    assert (project / "artifacts" / "classifier" / "config.json").is_file()
    version = json.loads((project / "reports" / "register.json").read_text())["version"]
    assert classifier_versions(project) == [1, int(version)]  # the built project's, and this run's
    assert "up to date" in sh("dvc", "status", cwd=project).stdout  # one record, wherever the stage ran
