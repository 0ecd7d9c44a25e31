"""The data stages under real DVC: first repro runs all, second none, and changes re-run just what depends on them."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_TRAINING

BIN = Path(sys.executable).parent
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
       "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def sh(*args, cwd, check=True):
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
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


@pytest.fixture
def project(tmp_path):
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    shutil.copytree(REPO / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "corpus").mkdir()
    write_docs(tmp_path / "corpus", "a.txt", 0, 30)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(50)))
    params = {
        "ingest": {"corpus": {"sources": [{"path": "corpus"}], "min_document_chars": 20, "heldout_fraction": 0.3},
                   "labeled": {"train": "train.tsv"}},
        "tokenizer": {"vocab_size": 150, "min_frequency": 1},
        "pretrain_data": {"max_seq_length": 32, "dupe_factor": 1, "num_proc": 1},
        **TINY_TRAINING,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path)
    sh("bertflow", "sync-dvc", cwd=tmp_path)
    return tmp_path


def set_param(project: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_skips_and_reruns_exactly_what_changed(project):
    deps = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert deps[:2] == ["corpus", "train.tsv"] and "tasks/ingest.py" in deps
    assert repro(project) == ["ingest", "tokenizer", "pretrain_data"]
    assert repro(project) == []
    set_param(project, "tokenizer", "vocab_size", 160)
    assert repro(project) == ["tokenizer", "pretrain_data"]
    write_docs(project / "corpus", "b.txt", 100, 3)
    assert repro(project) == ["ingest", "tokenizer", "pretrain_data"]
    assert "up to date" in sh("dvc", "status", "pretrain_data", cwd=project).stdout
    for stage in ("ingest", "tokenizer", "pretrain_data"):
        assert (project / "reports" / f"{stage}.json").is_file()
    metrics = sh("dvc", "metrics", "show", cwd=project).stdout
    assert "train.instances" in metrics or "instances" in metrics


def test_stale_dvc_deps_are_refused(project):
    (project / "more").mkdir()
    write_docs(project / "more", "c.txt", 200, 3)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["corpus"]["sources"].append({"path": "more"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = sh("dvc", "repro", cwd=project, check=False)
    assert result.returncode != 0
    assert "stage ingest does not depend on ['more']" in result.stdout + result.stderr
    assert not (project / "data" / "corpus").exists()
    sh("bertflow", "sync-dvc", cwd=project)
    assert repro(project) == ["ingest", "tokenizer", "pretrain_data"]


def test_whole_chain_under_dvc(project):
    stages = ["ingest", "tokenizer", "pretrain_data", "pretrain", "finetune", "evaluate", "register"]
    assert repro(project, "register") == stages
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert repro(project, "register") == []
    set_param(project, "finetune", "learning_rate", 0.0005)
    assert repro(project, "register") == ["finetune", "evaluate", "register"]
    registered = json.loads((project / "reports" / "register.json").read_text())
    assert registered["version"] == "2" and (project / "mlruns" / "mlflow.db").is_file()
    metrics = sh("dvc", "metrics", "show", "--json", cwd=project).stdout
    assert "test.accuracy" in metrics or '"accuracy"' in metrics
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=project).stdout)["data"]
    assert set(plots) == {"pretraining loss", "held-out MLM and NSP", "fine-tuning dev accuracy",
                          "test confusion matrix", "reports/evaluate/confusion.png"}
    assert "mlm_accuracy" in json.dumps(plots["held-out MLM and NSP"])
