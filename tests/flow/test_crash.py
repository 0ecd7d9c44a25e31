"""A crash anywhere loses nothing: the flow process killed with SIGKILL inside a data stage, inside
pretraining and inside register; each time the lock is free, nothing is half-written, and the next run
finishes what was left, to the same figures and registry state as a run that was never interrupted.
That uninterrupted run puts its training stages on a Prefect work pool (the pool's test: one record,
the same figures, wherever a stage runs)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import yaml

from tests.flow.conftest import (
    BIN,
    ENV,
    api_env,
    background,
    classifier_versions,
    copy_project,
    lean,
    mlflow_client,
    pooled_runs,
    registered_version,
    set_param,
    sh,
    stop,
)

TIMING = re.compile(r"second|per_s|latency|speedup|throughput|_ms|tokens_per|mfu|flops|weights_mb|logging|resumed",
                    re.I)


def changed_copy(built_project, folder: Path) -> Path:
    """A copy of the built project with settings that re-run pretrain_data onward, pretraining long
    enough to be caught mid-way and checkpointing every few steps, without the optional parts that do
    not bear on a crash (conftest.LEAN: they would run four times here)."""
    project = lean(copy_project(built_project[0], folder))
    set_param(project, "pretrain_data", "dupe_factor", 2)
    set_param(project, "pretrain", "max_steps", 40)
    set_param(project, "pretrain", "checkpoint_every_steps", 4)
    return project


def start_flow(project: Path, url: str, env: dict | None = None) -> subprocess.Popen:
    """``bertflow-flow run`` in a process of its own; its output goes to flow-<n>.log beside the project."""
    env = env or {**ENV, "PREFECT_API_URL": url}
    log = project.parent / f"flow-{len(list(project.parent.glob('flow-*.log')))}.log"
    process = subprocess.Popen([str(BIN / "bertflow-flow"), "run", "--root", str(project)], cwd=project, env=env,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    process.log = log
    return process


def stage_processes(stage: str, project: Path) -> list[int]:
    """Pids of running ``bertflow <stage>`` commands working in ``project`` (make test's other worker
    may be running the same stage in a project of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                cwd = (entry / "cwd").resolve()
            except OSError:
                continue
            if any(a.endswith(b"/bertflow") for a in args) and stage.encode() in args and cwd == project.resolve():
                found.append(int(entry.name))
    return found


def wait_until(predicate, flow: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert flow.poll() is None, f"the flow ended (exit {flow.returncode}) before {what}: " + \
            flow.log.read_text()[-3000:]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lock_holders(project: Path) -> list[int]:
    """Pids DVC's rwlock names that still exist (DVC itself calls such a path busy)."""
    import psutil

    path = project / ".dvc" / "tmp" / "rwlock"
    text = path.read_text() if path.is_file() else ""
    return [int(pid) for pid in re.findall(r'"pid":\s*(\d+)', text) if psutil.pid_exists(int(pid))]


def kill(flow: subprocess.Popen, stage: str) -> None:
    os.kill(flow.pid, signal.SIGKILL)
    flow.wait()
    project = Path(flow.args[3])
    deadline = time.time() + 15
    # the stage's process group (dvc, the stage) dies with the flow (bertflow/lifeline.py)
    while stage_processes(stage, project) or lock_holders(project):
        assert time.time() < deadline, f"bertflow {stage} or its dvc kept running after the flow was killed"
        time.sleep(0.1)


def versions(project: Path) -> int:
    with sqlite3.connect(project / "mlruns" / "mlflow.db") as connection:
        return connection.execute("SELECT COUNT(*) FROM model_versions").fetchone()[0]


def nothing_half_written(project: Path) -> None:
    from flows.pipeline import pipeline_lock

    with pipeline_lock(project, 0):  # the killed run's lock is free
        pass
    status = sh("dvc", "status", cwd=project).stdout
    assert "ingest:" not in status and "tokenizer:" not in status  # finished stages stay finished
    data = project / "data" / "pretrain"
    if data.exists():  # an output is there whole, or not at all
        assert (data / "info.json").is_file()
    assert not (project / "artifacts" / "classifier").exists() or (project / "artifacts" / "classifier" /
                                                                   "config.json").is_file()


def figures(project: Path) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not TIMING.search(k)}
        return [strip(v) for v in value] if isinstance(value, list) else value
    names = ["pretrain_data", "pretrain", "finetune", "evaluate", "attention"]
    return {name: strip(json.loads((project / "reports" / f"{name}.json").read_text())) for name in names}


def registry_state(project: Path) -> dict:
    client = mlflow_client(project)
    found = client.search_model_versions("name='tiny'")
    aliases = client.get_registered_model("tiny").aliases
    return {"fp32": sum(v.tags.get("variant") == "fp32" for v in found), "versions": len(found),
            "aliases": sorted(aliases), "decisions": sorted(v.tags.get("gate.decision", "") for v in found
                                                             if v.tags.get("variant") == "fp32")}


def pooled_reference(built_project, url: str, folder: Path) -> Path:
    """The run that is never interrupted, with its training stages on a Prefect work pool: a process
    worker runs pretrain and finetune as flow runs of the ``bertflow-stage`` deployment, and the record
    (dvc.lock, the registry) is the same as wherever else a stage runs. The crashed project runs them in
    the flow, so the two runs also show that the pool changes no figure."""
    project = changed_copy(built_project, folder)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distributed"] = {"work_pool": "training", "deployment": "tiny-training"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = api_env(url, folder)
    sh(str(BIN / "prefect"), "work-pool", "create", "training", "--type", "process", cwd=project, env=env)
    deployed = sh(str(BIN / "bertflow-flow"), "deploy-training", "--root", str(project), cwd=project, env=env)
    assert "bertflow-stage/tiny-training" in deployed.stdout
    worker = background([str(BIN / "prefect"), "worker", "start", "--pool", "training"], project, env,
                        folder / "worker.log")
    try:
        done = start_flow(project, url, env)
        assert done.wait(timeout=900) == 0, done.log.read_text()[-3000:] + (folder / "worker.log").read_text()[-3000:]
    finally:
        stop(worker)
    assert pooled_runs(env, "tiny-training") == [["finetune", "COMPLETED"], ["pretrain", "COMPLETED"]]
    assert "pretrain@training" in done.log.read_text()
    assert (project / "artifacts" / "classifier" / "config.json").is_file()
    # the built project's, and this run's
    assert classifier_versions(project) == [registered_version(built_project[0]), registered_version(project)]
    assert "up to date" in sh("dvc", "status", cwd=project).stdout  # one record, wherever the stage ran
    return project


def test_a_killed_flow_loses_nothing(built_project, prefect_api, tmp_path):
    reference = pooled_reference(built_project, prefect_api, tmp_path / "reference")

    project = changed_copy(built_project, tmp_path / "crashed")
    before = versions(project)

    flow = start_flow(project, prefect_api)  # 1: inside a data stage
    wait_until(lambda: stage_processes("pretrain_data", project), flow, 300, "pretrain_data to start")
    time.sleep(0.5)
    kill(flow, "pretrain_data")
    nothing_half_written(project)

    checkpoints = project / "artifacts" / "pretrain_checkpoints"
    earlier = {p.name for p in checkpoints.glob("step-*")}  # the built project's own, from its shorter run
    flow = start_flow(project, prefect_api)  # 2: inside pretraining, after a checkpoint of this run
    wait_until(lambda: stage_processes("pretrain", project) and {p.name for p in checkpoints.glob("step-*")} - earlier,
               flow, 300, "pretraining's first checkpoint")
    kill(flow, "pretrain")
    nothing_half_written(project)
    assert list(checkpoints.glob("step-*")), "pretraining left no checkpoint to resume from"
    assert not (project / "artifacts" / "pretrained").exists()

    flow = start_flow(project, prefect_api)  # 3: inside register, once MLflow made the version
    wait_until(lambda: versions(project) > before, flow, 600, "register to create the model version")
    # the stage at once, then the flow: a version that loses the gate gets no variants, so what register has
    # left after making it can take less than the lifeline's poll (0.2 s); had register ended before the kill,
    # DVC would run it again and, rightly, register anew
    for pid in stage_processes("register", project):
        os.kill(pid, signal.SIGKILL)
    kill(flow, "register")
    nothing_half_written(project)

    flow = start_flow(project, prefect_api)  # the next run finishes it all
    assert flow.wait(timeout=900) == 0, flow.log.read_text()[-3000:]
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert json.loads((project / "reports" / "pretrain.json").read_text())["resumed_from_step"] > 0
    assert figures(project) == figures(reference)
    assert registry_state(project) == registry_state(reference)
    assert registry_state(project)["fp32"] == 2  # the built project's v1 and one more: not two more
    assert not list(project.rglob("*.tmp-*"))
