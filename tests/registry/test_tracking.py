"""Tracking against a real MLflow store (embedded SQLite) and a real HTTP client: runs with their stages' real
times, curves at their rows' times, system metrics, data sets with DVC's digests, test figures on the logged
model, git source tags, and MLflow's own retries driven by params. The project is written by hand (no
training), so these take seconds."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from bertflow import timings, tracking
from bertflow.params import RegisterParams
from bertflow.paths import Paths
from bertflow.registry import RegistryError, configure_client, http_settings, retrying
from tests.conftest import forget_mlflow_uris

T0 = 1_700_000_000_000  # the recorded times, in ms: a run written long after its stages ran still shows them


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def project(root: Path) -> Paths:
    """Reports, timing files, curves with times, a CPU/memory CSV, data files and a dvc.lock + DVC cache manifest."""
    paths = Paths(root)
    for index, stage in enumerate(tracking.STAGE_ORDER):
        start = T0 + index * 60_000
        timings.write_stage_reports(paths, stage, {"figure": index, "seconds": 50.0}, start, start + 50_000)
    timings.write_stage_reports(paths, "evaluate", {"test": {"accuracy": 0.75, "macro_f1": 0.7}, "seconds": 9.0},
                                T0 + 400_000, T0 + 410_000)
    (root / "reports" / "pretrain").mkdir(parents=True)
    (root / "reports" / "pretrain" / "train.csv").write_text(
        f"step,loss,time\n1,5.0,{(T0 + 250_000) / 1000}\n2,4.0,{(T0 + 251_500) / 1000}\n")
    (root / "reports" / "finetune").mkdir(parents=True)
    (root / "reports" / "finetune" / "pretrained.csv").write_text("step,dev_accuracy\n5,0.6\n")  # no time column
    (root / "reports" / "timing" / "pretrain.csv").write_text(
        ",".join(timings.SYSTEM_FIELDS) + f"\n{(T0 + 250_000) / 1000},55.0,1200.5,40.0\n"
        f"{(T0 + 260_000) / 1000},95.0,1300.0,42.0\n")
    labeled = root / "data" / "labeled"
    labeled.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (labeled / f"{split}.parquet").write_bytes(f"{split} rows".encode())
    (root / "data" / "corpus").mkdir(parents=True)
    (root / "data" / "corpus" / "train.parquet").write_bytes(b"corpus")
    # dvc.lock records the corpus folder and train.parquet (register's entry, an all-digit md5, is stale);
    # dev.parquet is found in the folder's manifest in the DVC cache (a made-up md5, so the test tells it from
    # the file's own); test.parquet in neither: its bytes' md5
    folder_md5 = "0" * 32 + ".dir"
    manifest = root / ".dvc" / "cache" / "files" / "md5" / folder_md5[:2] / folder_md5[2:]
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps([{"md5": "d" * 32, "relpath": "dev.parquet"}]))
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    outs:\n"
        f"    - path: data/corpus\n      md5: c{'1' * 31}.dir\n"
        f"    - path: data/labeled\n      md5: {folder_md5}\n"
        f"  tokenizer:\n    cmd: x\n    deps:\n    - path: data/labeled/train.parquet\n      md5: {'a' * 32}\n"
        f"  register:\n    cmd: x\n    deps:\n    - path: data/labeled/test.parquet\n      md5: {'9' * 32}\n")
    return paths


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    yield client, experiment
    forget_mlflow_uris()


def test_runs_curves_and_system_metrics_keep_their_recorded_times(tmp_path, store):
    client, experiment = store
    paths = project(tmp_path / "project")
    run_id = tracking.log_pipeline_run(client, experiment, {"pretrain": {"max_steps": 2}}, paths,
                                       tracking.lineage_tags(paths))
    parent = client.get_run(run_id)
    assert parent.info.start_time == T0  # the first stage's start
    children = {run.data.tags["stage"]: run for run in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{run_id}'")}
    for stage in tracking.STAGE_ORDER:
        recorded = timings.read_timing(paths, stage)
        assert (children[stage].info.start_time, children[stage].info.end_time) == (
            recorded["start"], recorded["end"]), stage
        assert children[stage].info.status == "FINISHED"
    pretrain = children["pretrain"].info.run_id
    curve = client.get_metric_history(pretrain, "train.loss")
    assert [(m.step, m.value, m.timestamp) for m in curve] == [(1, 5.0, T0 + 250_000), (2, 4.0, T0 + 251_500)]
    assert not client.get_metric_history(pretrain, "train.time")  # the time is the point's, not a metric
    finetune_curve = client.get_metric_history(children["finetune"].info.run_id, "pretrained.dev_accuracy")
    assert [m.timestamp for m in finetune_curve] == [timings.read_timing(paths, "finetune")["end"]]
    cpu = client.get_metric_history(pretrain, "system/cpu_utilization_percentage")
    assert [(m.step, m.value, m.timestamp) for m in cpu] == [(0, 55.0, T0 + 250_000), (1, 95.0, T0 + 260_000)]
    assert client.get_metric_history(pretrain, "system/system_memory_usage_megabytes")[1].value == 1300.0
    assert client.get_metric_history(pretrain, "seconds")[0].value == 50.0  # timings are still tracked
    # the test figures are not the parent's until they are the model's (log_model_metrics)
    assert "test.accuracy" not in parent.data.metrics


def test_data_sets_carry_dvc_digests_and_test_figures_go_to_the_logged_model(tmp_path, store):
    client, experiment = store
    paths = project(tmp_path / "project")
    run_id = tracking.log_pipeline_run(client, experiment, {}, paths, tracking.lineage_tags(paths))
    logged = {(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in client.get_run(run_id).inputs.dataset_inputs}
    test_md5 = md5(b"test rows")  # not register's stale lock entry ('9' * 32): only stages before register count
    assert logged == {("corpus", "c" + "1" * 31 + ".dir", "pretraining"), ("labeled/train", "a" * 32, "training"),
                      ("labeled/dev", "d" * 32, "validation"), ("labeled/test", test_md5, "test")}
    source = json.loads(next(i.dataset.source for i in client.get_run(run_id).inputs.dataset_inputs
                             if i.dataset.name == "corpus"))
    assert source == {"uri": str((paths.root / "data" / "corpus").resolve())}
    children = {run.data.tags["stage"]: run for run in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{run_id}'")}
    assert {i.dataset.name for i in children["finetune"].inputs.dataset_inputs} == {"labeled/train", "labeled/dev"}
    assert {i.dataset.name for i in children["evaluate"].inputs.dataset_inputs} == {"labeled/test"}

    model = client.create_logged_model(experiment, source_run_id=run_id, name="classifier")
    tracking.log_model_metrics(client, run_id, model.model_id, tracking.read_report(paths, "evaluate")["test"], paths)
    metrics = {m.key: m for m in client.get_logged_model(model.model_id).metrics}
    assert {key: m.value for key, m in metrics.items()} == {"test.accuracy": 0.75, "test.macro_f1": 0.7}
    accuracy = metrics["test.accuracy"]
    assert (accuracy.dataset_name, accuracy.dataset_digest) == ("labeled/test", test_md5)
    assert accuracy.timestamp == T0 + 410_000  # when evaluate ended
    assert client.get_run(run_id).data.metrics["test.accuracy"] == 0.75
    ranked = client.search_logged_models([experiment], order_by=[{"field_name": "metrics.test.accuracy",
                                                                  "ascending": False}])
    assert [m.model_id for m in ranked] == [model.model_id]


def test_data_set_digests_are_the_md5s_dvc_recorded(tmp_path):
    """A real `dvc repro` of an ingest-like stage with folder outputs: each split's digest is the md5 in DVC's
    manifest of its folder, the corpus's the folder's own md5 in dvc.lock."""


    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    write = ("import pathlib; [pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True) or pathlib.Path(p)"
             ".write_text(p) for p in ['data/corpus/train.parquet', 'data/labeled/train.parquet', "
             "'data/labeled/dev.parquet', 'data/labeled/test.parquet']]")
    stage = {"cmd": f'{sys.executable} -c "{write}"', "outs": ["data/corpus", "data/labeled"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stage}}))
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "-q"], cwd=tmp_path, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    lock = tracking.dvc_lock_hashes(tmp_path / "dvc.lock")
    found = tracking.data_sets(tmp_path)
    assert found["corpus"][1] == lock["data/corpus"] and lock["data/corpus"].endswith(".dir")
    folder = lock["data/labeled"]
    manifest = json.loads((tmp_path / ".dvc/cache/files/md5" / folder[:2] / folder[2:]).read_text())
    assert {f"labeled/{Path(e['relpath']).stem}": e["md5"] for e in manifest} == {
        name: digest for name, (_, digest, _) in found.items() if name.startswith("labeled/")}
    assert found["labeled/dev"][1] == md5(b"data/labeled/dev.parquet")  # DVC 3's md5 of a file: of its bytes


def test_git_source_tags_are_mlflows_own(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q", "-b", "work")
    git("remote", "add", "origin", "https://user:token@git.example.com/team/bertflow.git")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("commit", "-qm", "a")
    tags = tracking.lineage_tags(Paths(tmp_path))
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] and len(tags["git_commit"]) == 40
    assert tags["mlflow.source.git.branch"] == "work"
    assert tags["mlflow.source.git.repoURL"] == "https://***@git.example.com/team/bertflow.git"
    git("checkout", "-q", "--detach")
    assert "mlflow.source.git.branch" not in tracking.lineage_tags(Paths(tmp_path))  # a detached HEAD has none


# ---------------------------------------------------------------- retries: MLflow's, from params


def test_params_drive_mlflows_http_settings():
    settings = RegisterParams(retries=4, backoff_seconds=1.5, timeout_seconds=7.2)
    assert http_settings(settings) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
                                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "8"}
    assert http_settings(RegisterParams(retries=50))["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "10"  # MLflow's limit


class Busy(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers every request with 503 and counts them."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        Busy.requests.append(self.path)
        self.send_response(503)
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_mlflow_retries_a_busy_server_as_register_says_then_one_error_names_it(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://user:secret@127.0.0.1:{server.server_port}"
    for key in (*http_settings(RegisterParams()), "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    Busy.requests = []
    try:
        settings = RegisterParams(retries=2, backoff_seconds=0, timeout_seconds=5)
        client = configure_client(settings, uri)
        with pytest.raises(RegistryError) as failure:
            retrying(settings, "reach the tracking server", uri, lambda: client.search_experiments(max_results=1))
    finally:
        server.shutdown()
        forget_mlflow_uris()
    assert len(Busy.requests) == 3  # the first try and register.retries more, by MLflow's own client
    message = str(failure.value)
    assert message.startswith(f"MLflow registry at http://***@127.0.0.1:{server.server_port} did not answer "
                              "(reach the tracking server, 2 retries)")
    assert "secret" not in message and "run `bertflow register` again" in message
