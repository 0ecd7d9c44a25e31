"""A stage's outcome reaches its caller as data: the record `bertflow <stage>` leaves, and what the flow makes of it."""

from __future__ import annotations

import os
import subprocess
import sys

from bertflow.outcome import BAD_INPUT, ENV, FAILED, SUCCEEDED, read_outcome
from tests.conftest import REPO, write_params


def bertflow(params, root, stage: str, outcomes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(params), "--root", str(root), stage],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, ENV: str(outcomes)})


def test_a_multi_line_params_error_is_recorded_whole_and_the_flow_keeps_every_line(tiny, tmp_path):
    from flows.pipeline import BadInput, stage_failure

    params, folder = tiny
    params["pretrain_data"]["masked_lm_prob"] = 1.5
    params["tokenizer"]["vocab_sise"] = 100
    result = bertflow(write_params(folder, params), folder, "ingest", tmp_path / "outcomes")
    assert result.returncode == 2
    record = read_outcome(tmp_path / "outcomes", "ingest")
    assert record["status"] == BAD_INPUT and record["exit_code"] == 2 and record["error_type"] == "ParamsError"
    lines = record["message"].splitlines()
    assert len(lines) == 3 and "pretrain_data.masked_lm_prob" in lines[1] + lines[2]
    assert "tokenizer.vocab_sise" in lines[1] + lines[2]
    failure = stage_failure("ingest", record, ["ERROR: failed to reproduce 'ingest'"])
    assert isinstance(failure, BadInput) and all(line in str(failure) for line in lines)


def test_success_and_an_unexpected_failure_are_recorded(tiny, tmp_path):
    from flows.pipeline import BadInput, StageFailed, stage_failure

    params, folder = tiny
    path = write_params(folder, params)
    assert bertflow(path, folder, "ingest", tmp_path / "ok").returncode == 0
    assert read_outcome(tmp_path / "ok", "ingest") == {"stage": "ingest", "status": SUCCEEDED, "exit_code": 0,
                                                       "message": "", "error_type": None}
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the project root should be")
    result = bertflow(path, blocked, "ingest", tmp_path / "broken")
    assert result.returncode == 1 and "Traceback" in result.stderr  # an unexpected fault keeps Python's traceback
    record = read_outcome(tmp_path / "broken", "ingest")
    assert record["status"] == FAILED and record["exit_code"] == 1 and record["message"]
    failure = stage_failure("ingest", record, [])
    assert isinstance(failure, StageFailed) and not isinstance(failure, BadInput)
    never = stage_failure("ingest", None, ["Running stage 'ingest':", "ERROR: dvc.lock is locked"])
    assert "before it could report" in str(never) and "dvc.lock is locked" in str(never)


def test_nothing_is_written_without_the_variable(tiny):
    params, folder = tiny
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(write_params(folder, params)),
                             "--root", str(folder), "ingest"], cwd=REPO, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != ENV})
    assert result.returncode == 0
    written = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("ingest.json"))
    assert written == ["reports/ingest.json", "reports/timing/ingest.json"]  # the report and its timings only
