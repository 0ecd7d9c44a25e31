"""A module-wide run of the data stages on the tiny profile (a slice of the real data)."""

import shutil

import pytest

from tasks.cli import run_stage
from tests.conftest import REPO, SHARED_DATA

DATA_STAGES = ("ingest", "tokenizer", "pretrain_data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Root folder after ingest → tokenizer → pretrain_data with params.tiny.yaml."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need ../shared/data beside the repo")
    root = tmp_path_factory.mktemp("tiny_run")
    for stage in DATA_STAGES:
        run_stage(stage, REPO / "params.tiny.yaml", root)
    return root


def copy_upstream(src, dst, *names):
    for name in names:
        shutil.copytree(src / name, dst / name)
