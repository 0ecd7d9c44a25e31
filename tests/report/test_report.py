"""The run report on a complete tiny run: every section and image rendered by headless Chromium, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.report import SECTIONS
from tests.conftest import DATA_STAGES, REPO, copy_outputs
from tests.report.browser import inspect

# One make test worker (xdist --dist loadgroup) runs this module: they share one reported project
pytestmark = pytest.mark.xdist_group("report")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(tiny_run, tiny_optimized, tmp_path_factory):
    """A copy of the tiny optimized project after lm_baselines, attention, register and report."""
    import os
    import shutil

    from tasks.cli import run_stage

    root = copy_outputs(tiny_optimized, tmp_path_factory.mktemp("reported"))
    for stage in DATA_STAGES:  # tiny_trained copied the data stages' outputs, not their reports
        shutil.copy(tiny_run / "reports" / f"{stage}.json", root / "reports")
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        for stage in ("lm_baselines", "attention", "register", "report"):
            run_stage(stage, REPO / "params.tiny.yaml", root)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return root


def test_report_has_every_section_and_is_logged_to_the_mlflow_run(reported):
    from mlflow import MlflowClient

    figures = json.loads((reported / "reports" / "report.json").read_text())
    assert figures["sections"] == list(SECTIONS) and figures["missing"] == []
    assert figures["images"] >= 8  # 2 pretraining, 1 fine-tuning, confusion, LSTM loss, 3 attention views
    page = (reported / "reports" / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert page.count('src="data:image/png;base64,') == figures["images"]
    for text in ("pseudo-perplexity", "interpolated Kneser-Ney", "ablation: no pretraining",
                 "Is the difference real?", "% percentile bootstrap interval", "exact McNemar p",
                 "vs TF-IDF + logistic regression",
                 "onnx_int8", "models:/bertflow-tiny/", "git commit", "dvc.lock md5", "Prefect flow run",
                 "s on the CPU, "):  # where pretraining ran (the tiny profile pins the CPU)
        assert text in page, text
    registered = json.loads((reported / "reports" / "register.json").read_text())
    assert figures["mlflow"] == {"logged": True, "run_id": registered["run_id"],
                                 "artifact_uri": f"runs:/{registered['run_id']}/report.html"}
    uri = f"sqlite:///{reported / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    assert "report.html" in {a.path for a in client.list_artifacts(registered["run_id"])}
    logged = Path(client.download_artifacts(registered["run_id"], "report.html"))
    assert logged.read_bytes() == (reported / "reports" / "report.html").read_bytes()


def test_chromium_renders_every_section_and_image(reported, tmp_path):
    screenshot = tmp_path / "report.png"
    seen = inspect(reported / "reports" / "report.html", screenshot)
    assert seen["refused"] == []  # nothing asked of the network
    assert [s["id"] for s in seen["sections"]] == list(SECTIONS)
    assert [s["title"] for s in seen["sections"]] == list(SECTIONS.values())
    assert all(s["height"] > 60 and s["text"] > 20 for s in seen["sections"]), seen["sections"]
    figures = json.loads((reported / "reports" / "report.json").read_text())
    assert len(seen["images"]) == figures["images"]
    for shown in seen["images"]:  # decoded (a broken data: URI has no natural size) and laid out
        assert shown["complete"] and shown["width"] > 100 and shown["height"] > 100 and shown["shown"] > 50, shown
    assert screenshot.read_bytes()[:8] == PNG and screenshot.stat().st_size > 50_000


def test_the_chromium_check_sees_a_broken_image(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><main><section id="x"><h2>x</h2><img alt="bad" src="data:image/png;base64,AAAA">'
                      '<img alt="far" src="https://example.invalid/a.png"></section></main></body></html>')
    seen = inspect(broken, tmp_path / "broken.png")
    assert [image["width"] for image in seen["images"]] == [0, 0]
    assert seen["refused"] == ["https://example.invalid/a.png"]


def test_a_partial_run_still_gets_a_page_naming_what_is_missing(tiny_run, tmp_path):
    from tasks.cli import run_stage

    root = copy_outputs(tiny_run, tmp_path / "project")
    figures = run_stage("report", REPO / "params.tiny.yaml", root)
    assert figures["sections"] == list(SECTIONS)
    assert {"pretrain", "finetune", "evaluate", "register"} <= set(figures["missing"])
    assert figures["mlflow"]["logged"] is False and "register" in figures["mlflow"]["why"]
    page = (root / "reports" / "report.html").read_text(encoding="utf-8")
    assert "the pretrain stage has not run" in page and "Pretraining corpus" in page


def test_a_registry_that_does_not_answer_keeps_the_page(reported, tmp_path):
    """In a fresh process (MLflow caches a run's artifact store per process): exit 2, the registry named."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    root = tmp_path / "project"
    shutil.copytree(reported, root, ignore=shutil.ignore_patterns("*_checkpoints", "artifacts"))
    (root / "reports" / "report.html").unlink()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    result = subprocess.run([str(Path(sys.executable).parent / "bertflow"), "--params", str(REPO / "params.tiny.yaml"),
                             "--root", str(root), "report"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"bertflow report: error: MLflow registry at http://127.0.0.1:{port} did not answer" in result.stderr
    assert "run `bertflow report` again" in result.stderr
    assert "Lineage" in (root / "reports" / "report.html").read_text(encoding="utf-8")  # written before logging
