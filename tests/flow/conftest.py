"""Scratch projects for the flow tests: a git + DVC repository holding a copy of the code and tiny params."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_TRAINING, once_per_run

BIN = Path(sys.executable).parent
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
       "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def sh(*args, cwd, check=True, env=None):
    result = subprocess.run(args, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def repro(cwd, target: str = "pretrain_data") -> list[str]:
    out = sh("dvc", "repro", target, cwd=cwd).stdout
    return re.findall(r"Running stage '(\w+)'", out)


def write_docs(folder: Path, name: str, start: int, count: int) -> None:
    docs = [f"Document {i} is about the number {i}. It has a second sentence here. "
            f"And a third one about {i} too. The end of document {i} comes now." for i in range(start, start + count)]
    (folder / name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def mlflow_client(project: Path):
    """The project's embedded MLflow store (tracking and registry)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def classifier_versions(project: Path, name: str = "tiny") -> list[int]:
    """The registered classifier's versions (variant fp32), oldest first; each variant is a version too."""
    return sorted(int(v.version) for v in mlflow_client(project).search_model_versions(
        f"name='{name}' and tags.variant='fp32'"))


def registered_version(project: Path) -> int:
    """The classifier version the project's last register stage recorded (its variants come just before it,
    so the first classifier is not version 1 once variants are on)."""
    return int(json.loads((project / "reports" / "register.json").read_text())["version"])


def set_params(project: Path, changes: list[tuple[str, str, object]]) -> Path:
    """(section, key, value) changes to params.yaml in one read and one write; a dotted key reaches into a
    sub-section (``("lm_baselines", "lstm.enabled", False)``)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, key, value in changes:
        *parents, leaf = key.split(".")
        target = params[section]
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def set_param(project: Path, section: str, key: str, value) -> None:
    set_params(project, [(section, key, value)])


# The optional parts a test of orchestration does not look at (the ablation, the baselines, all variants
# but int8, report logging), switched off by the crash test, whose runs re-run pretrain_data onward four
# times: each re-run then costs about a third less. Every part stays covered: the built project runs them
# all, and test_whole_chain_under_dvc switches them off. int8 stays so register logs one variant after the
# classifier's version (the crash test kills register in that window).
LEAN = [("finetune", "random_init_ablation", False), ("evaluate", "majority_baseline", False),
        ("evaluate", "tfidf_baseline", False), ("optimize", "variants", ["int8"]), ("report", "log_to_mlflow", False)]


def lean(project: Path) -> Path:
    return set_params(project, LEAN)


@pytest.fixture
def project(tmp_path):
    """dvc.yaml, bertflow/, tasks/ and flows/ copied, a tiny corpus and labeled set, a DVC remote beside it."""
    return new_project(tmp_path)


def new_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "prefect.toml"):  # prefect.toml: Prefect's settings for processes started in the project
        shutil.copy(REPO / name, root)
    for package in ("bertflow", "tasks", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "corpus").mkdir()
    write_docs(root / "corpus", "a.txt", 0, 30)
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(50)))
    params = {
        "ingest": {"corpus": {"sources": [{"path": "corpus"}], "min_document_chars": 20, "heldout_fraction": 0.3},
                   "labeled": {"train": "train.tsv"}},
        "tokenizer": {"vocab_size": 150, "min_frequency": 1},
        "pretrain_data": {"max_seq_length": 32, "dupe_factor": 1, "num_proc": 1},
        **TINY_TRAINING,
        "schedule": {"deployment": "tiny-nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/mlruns/\n")
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"), cwd=root)
    sh("bertflow", "sync-dvc", cwd=root)
    return root


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> tuple[Path, list[str]]:
    """(root, stages run) of one tiny project after `dvc repro report` from nothing: built once per test run.

    Tests that need a whole chain behind them take a private copy (``built``), so the chain is not
    rebuilt for each; the one flow test that must run every stage from nothing still builds its own.
    """
    def build(folder: Path) -> tuple[Path, list[str]]:
        root = new_project(folder)
        return root, repro(root, "report")

    root, stages = once_per_run(tmp_path_factory, "built", build)
    return Path(root), stages


@pytest.fixture
def built(built_project, tmp_path) -> Path:
    """A private copy of the built project (its DVC remote and MLflow store re-pointed at the copy)."""
    return copy_project(built_project[0], tmp_path)


def copy_project(source: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(source, root, symlinks=True)
    if (source.parent / "remote").is_dir():  # only once something was pushed
        shutil.copytree(source.parent / "remote", tmp_path / "remote")
    sh("dvc", "remote", "modify", "store", "url", str(tmp_path / "remote"), cwd=root)
    rebase_sqlite(root / "mlruns" / "mlflow.db", str(source), str(root))
    return root


def rebase_sqlite(database: Path, old: str, new: str) -> None:
    """Point every path an MLflow store holds (artifact roots, model sources) from ``old`` to ``new``."""
    import sqlite3

    with sqlite3.connect(database) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [row[1] for row in connection.execute(f"PRAGMA table_info('{table}')")
                       if row[2].upper().startswith(("VARCHAR", "TEXT"))]
            for column in columns:
                connection.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                                   f'WHERE "{column}" LIKE ?', (old, new, f"%{old}%"))


# The order `dvc repro report` runs the stages in (its own topological order; the flow's is flows.pipeline.STAGES).
WHOLE_CHAIN_DVC = ["ingest", "tokenizer", "lm_baselines", "pretrain_data", "pretrain", "finetune", "evaluate",
                   "attention", "optimize", "register", "report"]


# ---------------------------------------------------------------- a real Prefect API and processes that use it


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (the test harness's temporary server and SQLite database, a uvicorn process of its
    own) for in-process flow runs and for the processes the tests start; yields its URL. One per worker:
    a server costs some 20 CPU-seconds to start."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def api_env(url: str, tmp_path: Path) -> dict:
    """The environment of a process that talks to the Prefect API at ``url`` (a home of its own)."""
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": url}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def api_call(code: str, env: dict, *args: str) -> str:
    """The last line ``python -c code args`` prints, run against the API ``env`` names."""
    result = subprocess.run([str(BIN / "python"), "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def background(command: list[str], cwd, env: dict, log) -> subprocess.Popen:
    """``command`` in a session of its own (``stop`` ends it and its children), its output in ``log``."""
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


POOL_RUNS = """
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[sys.argv[1]])))
print(json.dumps(sorted([r.parameters["stage"], r.state.type.value] for r in runs)))
"""


def pooled_runs(env: dict, deployment: str) -> list[list[str]]:
    """``[stage, state]`` of every flow run of the work-pool ``deployment``, sorted."""
    return json.loads(api_call(POOL_RUNS, env, deployment))
