"""``bertflow restore``: a registered version's data, artifacts, dvc.lock and params.yaml come back after the
pipeline has moved on, and what it cannot restore is refused with one line and nothing changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from bertflow import restore, tracking
from tests.flow.conftest import mlflow_client, registered_version, repro, set_params, sh

# re-runs optimize (with one variant instead of five: quick) and register; artifacts/optimized changes
CHANGE = [("optimize", "variants", ["int8"])]


def commit(project: Path, message: str) -> None:
    sh("git", "add", "dvc.lock", "params.yaml", cwd=project)
    sh("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", message, cwd=project)


def recorded_lock(project: Path, version: int) -> dict[str, str]:
    """{path: md5} of the dvc.lock that register recorded with ``version``'s run."""
    client = mlflow_client(project)
    run_id = client.get_model_version("tiny", str(version)).tags["mlflow_run_id"]
    folder = Path(client.download_artifacts(run_id, "restore/dvc.lock", str(project.parent / f"lock-{version}")))
    return tracking.dvc_lock_hashes(folder)


def output_files(project: Path) -> dict[str, str]:
    """md5 of every file of the cached outputs of the stages before register, as dvc.lock names them."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [out["path"] for name, entry in lock["stages"].items() if name in restore.RESTORED_STAGES
            for out in entry.get("outs", [])]
    hashes = {}
    for out in outs:
        root = project / out
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                hashes[path.relative_to(project).as_posix()] = hashlib.md5(path.read_bytes()).hexdigest()
    return hashes


def dvc_status(project: Path, *targets: str) -> dict:
    return json.loads(sh("dvc", "status", "--json", *targets, cwd=project).stdout or "{}")


def test_restore_brings_back_a_registered_versions_data_and_artifacts(built):
    first = registered_version(built)
    params, files, lock = (built / "params.yaml").read_text(), output_files(built), recorded_lock(built, first)
    commit(built, "version A")
    assert repro(set_params(built, CHANGE), "register") == ["optimize", "register"]
    second = registered_version(built)
    assert second > first and output_files(built) != files
    moved_on = {name: (built / name).read_bytes() for name in ("dvc.lock", "params.yaml")}

    refused = sh("bertflow", "restore", f"models:/tiny/{first}", cwd=built, check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("bertflow restore: error: dvc.lock, params.yaml: "
                                                              "not committed as they are")
    assert {name: (built / name).read_bytes() for name in moved_on} == moved_on

    commit(built, "version B")
    restored = sh("bertflow", "restore", f"models:/tiny/{first}", cwd=built)
    assert f"restored tiny v{first}" in restored.stdout and "every output matches dvc.lock" in restored.stdout
    assert output_files(built) == files
    now = tracking.dvc_lock_hashes(built / "dvc.lock")
    assert now == {path: md5 for path, md5 in lock.items() if path in now} and len(now) > 20
    assert (built / "params.yaml").read_text() == params
    assert dvc_status(built, *restore.RESTORED_STAGES) == {}
    assert set(dvc_status(built)) == {"register", "report"}  # they run after a version is made: not restored
    commit_line = next(line for line in restored.stdout.splitlines() if "code: git commit" in line)
    assert mlflow_client(built).get_model_version("tiny", str(first)).tags["git_commit"] in commit_line


def test_restore_refuses_with_one_line_and_changes_nothing(built, tmp_path, monkeypatch, capsys):
    before = {name: (built / name).read_bytes() for name in ("dvc.lock", "params.yaml")}
    version = registered_version(built)

    def refused(uri: str, root: Path = built) -> str:
        assert restore.run(uri, root, force=True) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bertflow restore: error: "), lines
        assert {name: (built / name).read_bytes() for name in before} == before
        return lines[0]

    assert "not a model URI" in refused("models:/tiny")
    assert "not found" in refused("models:/tiny/99").lower()
    assert "alias nobody not found" in refused("models:/tiny@nobody").lower()
    assert "not a DVC repository" in refused(f"models:/tiny/{version}", tmp_path)

    client = mlflow_client(built)  # a version from a run without restore data (as before it was recorded)
    registered = client.get_run(client.get_model_version("tiny", str(version)).tags["mlflow_run_id"])
    run = client.create_run(registered.info.experiment_id)
    old = client.create_model_version("tiny", f"runs:/{run.info.run_id}/classifier", run.info.run_id)
    assert "registered before restore data was recorded" in refused(f"models:/tiny/{old.version}")

    shutil.move(built / ".dvc" / "cache", tmp_path / "cache")  # and the remote is empty: nothing was pushed
    message = refused("models:/tiny@challenger")
    assert "artifacts/classifier" in message and "not in the DVC cache" in message

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert "did not answer" in refused(f"models:/tiny/{version}")
