"""The register stage against real MLflow: tracking, the promotion gate, consumption, an unreachable registry."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertflow import timings
from bertflow.params import VARIANTS
from bertflow.paths import Paths
from bertflow.registry import Standing, Variant, fast_choice, promotion, redact
from bertflow.tracking import dvc_lock_hashes, flatten, numeric, read_curve
from tasks.register import CHALLENGER, CHAMPION, FAST, data_fingerprint
from tests.conftest import REPO, copy_outputs, forget_mlflow_uris

BIN = Path(sys.executable).parent
MLFLOW_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # a subprocess here names its store itself
CONSUMER = """
import sys
for blocked in ["bertflow", "tasks", *sys.argv[4:]]:  # a consumer has mlflow and a runtime, never bertflow
    sys.modules[blocked] = None
import json, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(json.loads(sys.argv[3]))
print(json.dumps(out.to_dict(orient="list")))
"""


# ---------------------------------------------------------------- pure pieces


def test_promotion_rule():
    new = Standing("new", 0.80, "abc")
    assert promotion(new, None, "accuracy", 0.0) == (CHAMPION, "no champion yet")
    decision, reason = promotion(new, Standing("3", 0.70, "xyz"), "accuracy", 0.0)
    assert decision == CHALLENGER and reason.startswith("not compared") and "v3" in reason
    assert promotion(new, Standing("3", 0.79, "abc"), "accuracy", 0.0)[0] == CHAMPION
    assert promotion(new, Standing("3", 0.79, "abc"), "accuracy", 0.02)[0] == CHALLENGER
    assert promotion(new, Standing("3", 0.78, "abc"), "accuracy", 0.02)[0] == CHAMPION
    assert promotion(new, Standing("3", 0.80, "abc"), "accuracy", 0.0)[0] == CHALLENGER  # a tie is no win
    assert promotion(new, Standing("3", 0.81, "abc"), "accuracy", 0.0)[0] == CHALLENGER


def test_fast_rule_takes_the_quickest_variant_within_the_accuracy_budget():
    variants = [Variant("fp32", "1", 0.80, 100.0), Variant("int8", "2", 0.795, 150.0),
                Variant("onnx_int8", "3", 0.785, 400.0), Variant("student", "4", 0.79, 300.0)]
    chosen, reason = fast_choice(variants, 0.80, 0.01)
    assert chosen.name == "student" and "over the budget: onnx_int8" in reason  # quicker, but 1.5 points down
    assert fast_choice(variants, 0.80, 0.02)[0].name == "onnx_int8"
    assert fast_choice(variants, 0.80, 0.0)[0].name == "fp32"
    assert fast_choice([Variant("a", "5", 0.70, 1.0)], 0.80, 0.01)[0] is None
    assert fast_choice([Variant("b", "6", 0.79, 1.0)], 0.80, 0.01)[0].name == "b"  # exactly at the budget


def test_fingerprint_depends_on_content_only():
    assert data_fingerprint(["a", "b"], ["0", "1"]) == data_fingerprint(["a", "b"], ["0", "1"])
    assert data_fingerprint(["a", "b"], ["0", "1"]) != data_fingerprint(["a", "b"], ["1", "1"])
    assert data_fingerprint(["ab", ""], ["0", "1"]) != data_fingerprint(["a", "b"], ["0", "1"])


def test_flatten_numeric_curves_and_lock(tmp_path):
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}
    assert numeric({"a": {"b": 1, "ok": True}, "d": "x", "e": 0.5}) == {"a.b": 1.0, "e": 0.5}
    (tmp_path / "c.csv").write_text("step,loss,lr\n1,2.5,1.0e-3\n10,2.0,n/a\n")
    assert read_curve(tmp_path / "c.csv") == [(1, {"loss": 2.5, "lr": 0.001}), (10, {"loss": 2.0})]
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  s:\n    cmd: x\n    deps:\n    - path: a\n      md5: 11\n"
        "    outs:\n    - path: b\n      md5: 22\n      size: 3\n")
    assert dvc_lock_hashes(tmp_path / "dvc.lock") == {"a": 11, "b": 22}
    assert redact("https://user:secret@host:5000") == "https://***@host:5000"


# ---------------------------------------------------------------- the stage, embedded store


@pytest.fixture
def trained_copy(tiny_trained, tmp_path):
    """A private copy of the tiny trained project (registering writes mlruns/ and reports/)."""
    return copy_outputs(tiny_trained, tmp_path / "project")


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def child_env() -> dict:
    """This process's environment without the MLflow URIs an in-process stage may have exported."""
    return {k: v for k, v in os.environ.items() if k not in MLFLOW_URIS}


def register(root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = child_env()
    environment.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {}))
    return subprocess.run(["bertflow", "--params", str(REPO / "params.tiny.yaml"), "--root", str(root), "register"],
                          capture_output=True, text=True, env=environment, timeout=600)


def register_here(root: Path, monkeypatch, tracking_uri: str | None = None, overrides: dict | None = None) -> dict:
    """The register stage in this test's process: the same ``run_stage`` the CLI calls, without another
    start of Python, MLflow and torch (some 15 CPU-seconds each); the CLI itself is ``register``."""

    from tasks.cli import run_stage

    # register sets these for its own process (MLflow exports its URIs to the environment, for children):
    # undone after the test, so no later test or subprocess of this worker inherits them
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    if tracking_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        return run_stage("register", REPO / "params.tiny.yaml", root, overrides)
    finally:
        forget_mlflow_uris()


def consume(uri: str, model_uri: str, texts: list[str], blocked: tuple[str, ...] = ()) -> dict:
    """What a fresh process without bertflow (and without the ``blocked`` modules) gets from the model."""
    result = subprocess.run([sys.executable, "-c", CONSUMER, uri, model_uri, json.dumps(texts), *blocked],
                            capture_output=True, text=True, timeout=600, cwd="/",
                            env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_register_tracks_gates_and_serves(trained_copy, monkeypatch, caplog):
    root = trained_copy
    first = register(root)
    assert first.returncode == 0, first.stderr[-3000:]
    first_report = (root / "reports" / "register.json").read_text()
    report = json.loads(first_report)
    # no optimize report here: the classifier itself is the only form, so `fast` is the champion too
    assert (report["version"], report["decision"], report["aliases"]) == ("1", CHAMPION, [CHALLENGER, CHAMPION, FAST])
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = client_for(uri)

    # the pipeline run: params, lineage tags, nested stage runs with curves, artifacts
    run = client.get_run(report["run_id"])
    assert run.data.params["pretrain.model.hidden_size"] == "64"
    assert run.data.params["finetune.learning_rate"]
    assert run.data.tags["git_commit"] and run.data.tags["git_dirty"] in ("true", "false", "unknown")
    assert run.data.metrics["test.accuracy"] == json.loads((root / "reports/evaluate.json").read_text())[
        "test"]["accuracy"]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == {"ingest", "tokenizer", "lm_baselines", "pretrain_data",
                                                         "pretrain", "finetune", "evaluate", "attention", "optimize"}
    pretrain_run = next(c for c in children if c.data.tags["stage"] == "pretrain")
    curve = client.get_metric_history(pretrain_run.info.run_id, "train.loss")
    assert len(curve) > 2 and len({m.step for m in curve}) == len(curve)
    finetune_run = next(c for c in children if c.data.tags["stage"] == "finetune")
    assert client.get_metric_history(finetune_run.info.run_id, "pretrained.dev_accuracy")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "reports"} <= artifacts
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "reports/evaluate")}
    assert "reports/evaluate/confusion.png" in logged
    assert not any("checkpoint" in a.path for a in client.list_artifacts(run.info.run_id, "reports"))
    assert "logging" not in report  # a timing: reports/timing/register.json, not the DVC metric
    assert timings.read_stage_report(Paths(root), "register")["logging"]["total_seconds"] > 0

    # real times: each stage's run starts and ends when the stage did, its curve points and CPU samples at theirs
    recorded = {stage: timings.read_timing(Paths(root), stage) for stage in ("pretrain", "finetune", "evaluate")}
    assert run.info.start_time == min(t["start"] for t in recorded.values())
    assert (pretrain_run.info.start_time, pretrain_run.info.end_time) == (recorded["pretrain"]["start"],
                                                                          recorded["pretrain"]["end"])
    rows = read_curve(root / "reports/pretrain/train.csv")
    assert [m.timestamp for m in sorted(curve, key=lambda m: m.step)] == [int(v["time"] * 1000) for _, v in rows]
    assert recorded["pretrain"]["start"] <= curve[0].timestamp <= recorded["pretrain"]["end"]
    cpu = client.get_metric_history(pretrain_run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(recorded["pretrain"]["start"] <= m.timestamp <= recorded["pretrain"]["end"] + 1000 for m in cpu)
    assert client.get_metric_history(finetune_run.info.run_id, "system/system_memory_usage_megabytes")
    # MLflow 3: the test split as a dataset (DVC's md5 of the file), the test figures on the logged model
    test_md5 = hashlib.md5((root / "data/labeled/test.parquet").read_bytes()).hexdigest()
    inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert inputs["labeled/test"] == test_md5 and inputs["labeled/train"]
    model = client.get_logged_model(report["model_id"])
    accuracy = next(m for m in model.metrics if m.key == "test.accuracy")
    assert (accuracy.value, accuracy.dataset_name, accuracy.dataset_digest) == (
        run.data.metrics["test.accuracy"], "labeled/test", test_md5)
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]

    # the version: tags, card, aliases
    version = client.get_model_version("bertflow-tiny", "1")
    assert version.tags["gate.decision"] == CHAMPION and version.tags["gate.reason"] == "no champion yet"
    assert "## Evaluation" in version.description and "## Lineage" in version.description
    assert "% percentile bootstrap interval, " in version.description and "McNemar p = " in version.description

    # a second registration of the same model does not beat the champion: challenger only; `fast`,
    # gone (as for a champion registered before the optimize stage existed), comes back on the champion
    client.delete_registered_model_alias("bertflow-tiny", FAST)
    register_here(root, monkeypatch)
    second = json.loads((root / "reports" / "register.json").read_text())
    assert (second["version"], second["decision"], second["aliases"]) == ("2", CHALLENGER, [CHALLENGER])
    assert str(client.get_model_version_by_alias("bertflow-tiny", CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias("bertflow-tiny", CHALLENGER).version) == "2"
    assert str(client.get_model_version_by_alias("bertflow-tiny", FAST).version) == "1"
    assert "does not beat champion v1" in client.get_model_version("bertflow-tiny", "2").tags["gate.reason"]

    # a register killed after it finished with MLflow but before it wrote reports/register.json: the
    # next run finds the version these inputs made and says so, registering nothing new
    done = (root / "reports" / "register.json").read_text()
    (root / "reports" / "register.json").write_text(first_report)  # as the killed run left it
    with caplog.at_level("INFO", logger="tasks.register"):
        register_here(root, monkeypatch)
    assert "was registered from these very inputs" in caplog.text
    after = json.loads((root / "reports" / "register.json").read_text())
    assert {k: v for k, v in after.items() if k != "logging"} == {k: v for k, v in json.loads(done).items()
                                                                   if k != "logging"}
    assert len(client.search_model_versions("name='bertflow-tiny' and tags.variant='fp32'")) == 2

    # other test data on the champion: not compared, stays challenger, and says why
    client.set_model_version_tag("bertflow-tiny", "1", "test_data_fingerprint", "other-data")
    register_here(root, monkeypatch)
    third = client.get_model_version("bertflow-tiny", "3")
    assert third.tags["gate.decision"] == CHALLENGER and third.tags["gate.reason"].startswith("not compared")

    # a champion measured lower on the same data is replaced
    client.set_model_version_tag("bertflow-tiny", "1", "test_data_fingerprint", report["test_data_fingerprint"])
    client.set_model_version_tag("bertflow-tiny", "1", "metric.accuracy", "0.0")
    register_here(root, monkeypatch)
    assert str(client.get_model_version_by_alias("bertflow-tiny", CHAMPION).version) == "4"
    assert str(client.get_model_version_by_alias("bertflow-tiny", FAST).version) == "4"  # a new champion's form

    # consumption: a fresh process without bertflow predicts what evaluate saved
    import pandas as pd

    saved = pd.read_csv(root / "reports/evaluate/predictions.csv", keep_default_na=False, dtype=str)
    served = consume(uri, "models:/bertflow-tiny@champion", saved["text"].tolist())
    assert served["label"] == saved["predicted"].tolist()
    for column in [c for c in saved.columns if c.startswith("score_")]:
        difference = max(abs(a - float(b)) for a, b in zip(served[column], saved[column], strict=True))
        assert difference <= 1e-5, column
    frame_input = consume(uri, "models:/bertflow-tiny@champion", saved["text"].tolist()[:3])
    assert frame_input["label"] == saved["predicted"].tolist()[:3]


def test_variants_are_versions_and_fast_never_goes_over_the_budget(tiny_optimized, tmp_path):
    root = copy_outputs(tiny_optimized, tmp_path / "project")
    path = root / "reports" / "optimize.json"
    optimize = json.loads(path.read_text())
    rows = optimize["variants"]
    quickest = max((name for name in rows if name != "fp32"), key=lambda name: rows[name]["throughput_b1"])
    rows[quickest]["accuracy"] = round(rows["fp32"]["accuracy"] - 0.05, 5)  # outside the 1-point budget
    path.write_text(json.dumps(optimize))

    result = register(root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "reports" / "register.json").read_text())
    assert report["decision"] == CHAMPION and set(report["variants"]) == set(VARIANTS)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = client_for(uri)
    for name, version in report["variants"].items():
        tags = client.get_model_version("bertflow-tiny", version).tags
        expected_tags = (name, report["version"], rows[name]["runtime"])
        assert (tags["variant"], tags["variant_of"], tags["runtime"]) == expected_tags
        assert float(tags["metric.accuracy"]) == rows[name]["accuracy"]
    eligible = {name: row for name, row in rows.items() if rows["fp32"]["accuracy"] - row["accuracy"] <= 0.01}
    expected = max(eligible, key=lambda name: eligible[name]["throughput_b1"])
    assert report["fast"]["variant"] == expected != quickest
    assert client.get_model_version_by_alias("bertflow-tiny", FAST).tags["variant"] == expected
    assert "## Variants" in client.get_model_version("bertflow-tiny", report["version"]).description

    # a clean registry: the champion's forms come before it, so the newest version and `latest` are the
    # classifier; every form is found by its tag; the registered model says what it is
    versions = client.search_model_versions("name='bertflow-tiny'")
    assert max(int(v.version) for v in versions) == int(report["version"])
    assert client.get_latest_versions("bertflow-tiny")[0].tags["variant"] == "fp32"
    found = client.search_model_versions(f"name='bertflow-tiny' and tags.variant_of='{report['version']}'")
    assert {v.tags["variant"]: str(v.version) for v in found} == report["variants"]
    model = client.get_registered_model("bertflow-tiny")
    assert "variant_of" in model.description and model.tags["built_by"] == "bertflow"

    # a run that loses the gate (the same accuracy: a tie is no win) adds one version and no variant weights
    (root / "reports" / "register.json").write_text("{}")
    assert register(root).returncode == 0
    lost = json.loads((root / "reports" / "register.json").read_text())
    assert lost["decision"] == CHALLENGER and lost["variants"] == {}
    assert len(client.search_model_versions("name='bertflow-tiny'")) == len(versions) + 1
    assert str(client.get_model_version_by_alias("bertflow-tiny", FAST).version) == report["fast"]["version"]

    # a consumer of a variant needs only mlflow and its runtime, and gets the champion's output format
    texts = ["a fine film", "slow and boring", "warm and funny"]
    champion = consume(uri, "models:/bertflow-tiny@champion", texts)
    onnx = consume(uri, f"models:/bertflow-tiny/{report['variants']['onnx_int8']}", texts, ("torch", "transformers"))
    int8 = consume(uri, f"models:/bertflow-tiny/{report['variants']['int8']}", texts, ("onnxruntime",))
    fast = consume(uri, "models:/bertflow-tiny@fast", texts)
    for served in (onnx, int8, fast):
        assert list(served) == list(champion) and len(served["label"]) == 3
    assert int8["label"] == champion["label"]


# ---------------------------------------------------------------- a real server, down then up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_port():
    return free_port()


def start_server(folder: Path, port: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art")],
        cwd=folder, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError((folder / "server.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    process.kill()
    raise AssertionError("mlflow server did not start")


def stop_server(process: subprocess.Popen) -> None:
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def test_unreachable_registry_then_register_alone(trained_copy, server_port, tmp_path, monkeypatch):
    root = trained_copy
    uri = f"http://127.0.0.1:{server_port}"
    classifier = sorted(p.name for p in (root / "artifacts/classifier").iterdir())
    down = register(root, {"MLFLOW_TRACKING_URI": uri})
    assert down.returncode == 2
    message = down.stderr.strip().splitlines()[-1]
    assert message.startswith("bertflow register: error: MLflow registry at http://127.0.0.1:")
    assert "did not answer" in message and "run `bertflow register` again" in message
    assert sorted(p.name for p in (root / "artifacts/classifier").iterdir()) == classifier
    assert not (root / "reports/register.json").exists()

    server = start_server(tmp_path / "server", server_port)
    try:
        register_here(root, monkeypatch, uri)  # the CLI's refusal is above; this is the same run_stage
        report = json.loads((root / "reports/register.json").read_text())
        assert report["tracking_uri"] == uri and report["decision"] == CHAMPION
        assert str(client_for(uri).get_model_version_by_alias("bertflow-tiny", CHAMPION).version) == "1"
        served = consume(uri, "models:/bertflow-tiny@champion", ["a fine film"])
        assert len(served["label"]) == 1
        assert not (root / "mlruns").exists()  # the server, not the embedded store, got the run
    finally:
        stop_server(server)
