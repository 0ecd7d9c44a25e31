"""Shared test helpers: the repo and data locations, and writing a params file into a temp folder."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Sentences of a tiny hand-written corpus: four documents, one of them a duplicate, one too short.
TINY_CORPUS = """\
The cat sat on the mat. It was a sunny day. Mr. Brown watched the cat from his window.
He made some tea. The tea was hot! Was the cat hungry? Nobody knew.

Rivers flow to the sea. The sea is salty. Fish swim in the rivers and in the sea.
Some fish are large. Others are small.

Short.

The cat sat on the mat. It was a sunny day. Mr. Brown watched the cat from his window.
He made some tea. The tea was hot! Was the cat hungry? Nobody knew.

Mountains are tall and cold. Snow falls on them in winter. Climbers need ropes and boots.
The view from the top is wide. Clouds drift below the peaks.
"""

LABELED_TSV = "sentence\tlabel\na fine film\t1\na dull film\t0\nwarm and funny\t1\nslow and boring\t0\n"


TINY_TRAINING = {
    "lm_baselines": {"lstm": {"embedding_size": 16, "hidden_size": 16, "max_steps": 10, "log_every": 5}},
    "pretrain": {"model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 64, "max_position_embeddings": 64}, "max_steps": 10, "batch_size": 8,
                 "device": "cpu",  # the tests' expectations hold on the CPU, also on a machine with GPUs
                 # ten steps do not repay torch.compile's seconds; the compiled loss is tested on the tiny
                 # profile (tests/model: tiny_trained, test_pretrain.py)
                 "compile_loss": False},
    "finetune": {"max_seq_length": 32, "epochs": 1, "batch_size": 8, "device": "cpu"},
    "evaluate": {},
    "optimize": {"distill": {"student": {"num_hidden_layers": 1}, "epochs": 1}, "prune": {"recovery_steps": 5},
                 "latency_sentences": 10, "rounds": 1},
    "attention": {"num_threads": 1},
    "register": {"model_name": "tiny", "retries": 0},
    "report": {"log_to_mlflow": True},
}


def tiny_params(tmp_path: Path) -> dict:
    """A complete params mapping over files written into ``tmp_path``."""
    (tmp_path / "corpus").mkdir(exist_ok=True)
    (tmp_path / "corpus" / "a.txt").write_text(TINY_CORPUS, encoding="utf-8")
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.tsv").write_text(LABELED_TSV, encoding="utf-8")
    return {
        "ingest": {
            "corpus": {"sources": [{"path": "corpus"}], "min_document_chars": 20,
                       # hash fractions: cat 0.593, rivers 0.178, mountains 0.1779 → only mountains held out
                       "heldout_fraction": 0.178},
            "labeled": {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
        },
        "tokenizer": {"vocab_size": 200, "min_frequency": 1},
        "pretrain_data": {"max_seq_length": 32, "dupe_factor": 2, "num_proc": 1, "masking": "static"},
        **TINY_TRAINING,
    }


def tiny_profile() -> dict:
    """params.tiny.yaml as a dict whose input paths (read relative to the params file) are absolute, so that a
    changed copy written anywhere reads the same data."""
    params = yaml.safe_load((REPO / "params.tiny.yaml").read_text())
    ingest = params["ingest"]
    for source in ingest["corpus"]["sources"]:
        source["path"] = str((REPO / source["path"]).resolve())
    for split in ("train", "dev", "test"):
        ingest["labeled"][split] = str((REPO / ingest["labeled"][split]).resolve())
    return params


def write_params(folder: Path, params: dict, name: str = "params.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path: Path):
    """(params mapping, folder) for the hand-written tiny corpus; edit the mapping, then write it."""
    return copy.deepcopy(tiny_params(tmp_path)), tmp_path


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], object]):
    """``build(folder)`` once per test run, also across pytest-xdist's workers: the first to ask builds
    (the others wait on a lock) and every worker gets the same result (JSON-able; paths as strings).
    Session-scoped fixtures use it, so ``make test``'s workers share one tiny chain instead of each
    building its own. A failed build leaves no record: the next worker to ask builds again (and fails)."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    record = tmp_path_factory.getbasetemp().parent / f"{name}.json"
    with FileLock(f"{record}.lock"):
        if not record.is_file():
            record.write_text(json.dumps(build(tmp_path_factory.mktemp(name)), default=str))
        return json.loads(record.read_text())


DATA_STAGES = ("ingest", "tokenizer", "pretrain_data")
TRAINING_STAGES = ("pretrain", "finetune", "evaluate")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Root folder after ingest → tokenizer → pretrain_data with params.tiny.yaml (real data, sliced)."""
    from tasks.cli import run_stage

    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need ../shared/data beside the repo")

    def build(root: Path) -> Path:
        for stage in DATA_STAGES:
            run_stage(stage, REPO / "params.tiny.yaml", root)
        return root

    return Path(once_per_run(tmp_path_factory, "tiny_run", build))


@pytest.fixture(scope="session")
def tiny_trained(tiny_run, tmp_path_factory):
    """A copy of ``tiny_run`` after pretrain → finetune → evaluate."""
    import shutil

    from tasks.cli import run_stage

    def build(root: Path) -> Path:
        for name in ("data", "artifacts"):
            shutil.copytree(tiny_run / name, root / name)
        for stage in TRAINING_STAGES:
            run_stage(stage, REPO / "params.tiny.yaml", root)
        return root

    return Path(once_per_run(tmp_path_factory, "tiny_trained", build))


def forget_mlflow_uris() -> None:
    """Undo what a registration in this process set: MLflow's tracking and registry URIs and the environment
    variables it exports for children. ``mlflow.set_registry_uri(None)`` alone leaves MLFLOW_REGISTRY_URI
    behind, and a later ``models:/`` in the same pytest worker then reads another test's store."""
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)


def copy_outputs(source: Path, target: Path) -> Path:
    """A private copy of a project's data/, artifacts/ and reports/ (checkpoints left out)."""
    import shutil

    for name in ("data", "artifacts", "reports"):
        shutil.copytree(source / name, target / name, ignore=shutil.ignore_patterns("*_checkpoints"))
    return target


@pytest.fixture(scope="session")
def tiny_optimized(tiny_trained, tmp_path_factory):
    """A copy of ``tiny_trained`` after optimize (params.tiny.yaml: every variant)."""

    from tasks.cli import run_stage

    def build(root: Path) -> Path:
        run_stage("optimize", REPO / "params.tiny.yaml", copy_outputs(tiny_trained, root))
        return root

    return Path(once_per_run(tmp_path_factory, "tiny_optimized", build))


def outputs_left(root: Path) -> list[str]:
    """Everything a stage may have written under ``root`` (data/, artifacts/, reports/)."""
    return sorted(str(p.relative_to(root)) for top in ("data", "artifacts", "reports")
                  for p in (root / top).rglob("*") if p.is_file())


def kill_stage_after_first_checkpoint(stage: str, root: Path, checkpoints: Path, overrides: dict) -> None:
    """Run ``stage`` (tiny profile) in a child process and SIGKILL it once its first checkpoint exists."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import json, sys; from tasks.cli import run_stage; "
            "run_stage(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))")
    process = subprocess.Popen([sys.executable, "-c", code, stage, str(REPO / "params.tiny.yaml"), str(root),
                                json.dumps(overrides)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(checkpoints.glob("step-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
