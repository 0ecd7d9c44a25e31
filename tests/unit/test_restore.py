"""The pure parts of ``bertflow restore``: reading the URI, the lock it writes, what ``dvc status`` says."""

from __future__ import annotations

import pytest
import yaml

from bertflow import tracking
from bertflow.restore import RestoreError, Target, changed, parse_uri, restored_lock
from tests.conftest import REPO


def test_model_and_run_uris_are_read_and_anything_else_refused():
    assert parse_uri("models:/tiny/3") == Target("models:/tiny/3", name="tiny", version="3")
    assert parse_uri("models:/tiny@champion") == Target("models:/tiny@champion", name="tiny", alias="champion")
    assert parse_uri("runs:/abc123/classifier") == Target("runs:/abc123/classifier", run_id="abc123")
    for bad in ("models:/tiny", "models:/tiny/latest", "models:/@x", "runs:/", "tiny/3", "artifacts/classifier"):
        with pytest.raises(RestoreError, match="not a model URI"):
            parse_uri(bad)


def test_the_restored_lock_keeps_the_stages_before_register_only():
    recorded = {"schema": "2.0", "stages": {name: {"cmd": f"bertflow {name}"} for name in
                                            ("ingest", "finetune", "register", "report")}}
    restored = yaml.safe_load(restored_lock(yaml.safe_dump(recorded)))
    assert restored == {"schema": "2.0", "stages": {"ingest": {"cmd": "bertflow ingest"},
                                                    "finetune": {"cmd": "bertflow finetune"}}}


def test_dvc_status_is_split_into_outputs_and_deps():
    status = {"finetune": [{"changed outs": {"artifacts/classifier": "not in cache"}},
                           {"changed deps": {"bertflow/training.py": "modified"}}, "always changed"],
              "ingest": [{"changed deps": {"corpus/a.txt": "modified"}}]}
    outs, deps = changed(status)
    assert outs == {"artifacts/classifier": "not in cache"}
    assert deps == ["bertflow/training.py (finetune: modified)", "corpus/a.txt (ingest: modified)"]


def test_the_uncached_outputs_are_the_reports_not_the_checkpoints():
    found = tracking.uncached_outputs(REPO / "dvc.yaml", tracking.STAGE_ORDER)
    assert "reports/evaluate.json" in found and "reports/finetune" in found
    assert not any("checkpoints" in path or path.startswith(("artifacts/", "data/")) for path in found)
    assert "reports/register.json" not in found  # register's own: not a stage a version is built from
