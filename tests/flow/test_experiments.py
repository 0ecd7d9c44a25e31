"""Every flow run is a DVC experiment, profiles leave params.yaml alone, and raw inputs are versioned (issue 21,
points 1 and 2), asked of the real tools: ``dvc exp show/apply``, ``dvc exp run --queue``, ``dvc import-url``,
``dvc pull`` from a local remote, MLflow's store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from tests.flow.conftest import mlflow_client, new_project, repro, set_params, sh
from tests.flow.test_dvc import EVERY_PART_OFF


def commit_all(project: Path, message: str = "the project as it stands") -> None:
    """Everything git does not ignore, committed (an experiment is a commit on top of one)."""
    sh("git", "config", "user.name", "bertflow tests", cwd=project)
    sh("git", "config", "user.email", "tests@bertflow.invalid", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", message, cwd=project)


def experiments_shown(project: Path) -> dict[str, dict]:
    """``dvc exp show --json`` as {experiment name: {rev, params (params.yaml), metrics ({file: figures})}}."""
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev["data"]
                found[rev["name"]] = {"rev": rev["rev"], "params": data["params"]["params.yaml"]["data"],
                                      "metrics": {path: m.get("data") for path, m in data["metrics"].items()}}
    return found


def imported_project(tmp_path: Path) -> tuple[Path, Path]:
    """(project, source folder): the tiny project whose corpus and labeled file live outside it and are brought in
    with ``dvc import-url`` under data/raw/, params pointing at the copies, everything committed."""
    root = new_project(tmp_path)
    source = tmp_path / "source"
    source.mkdir()
    shutil.move(root / "corpus", source / "corpus")
    shutil.move(root / "train.tsv", source / "train.tsv")
    (root / "data" / "raw").mkdir(parents=True)
    sh("dvc", "import-url", str(source / "corpus"), "data/raw/corpus", cwd=root)
    sh("dvc", "import-url", str(source / "train.tsv"), "data/raw/train.tsv", cwd=root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["corpus"]["sources"] = [{"path": "data/raw/corpus"}]
    params["ingest"]["labeled"]["train"] = "data/raw/train.tsv"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("bertflow", "sync-dvc", cwd=root)
    commit_all(root)
    return root, source


def test_a_flow_run_is_an_experiment_and_a_profile_leaves_params_yaml_alone(built, prefect_api, monkeypatch):
    """Two flow runs of the session's chain: one as it is (every stage skipped), one with a profile that turns the
    majority baseline off (evaluate, register and report re-run). Both are listed by ``dvc exp show`` with their
    params and metrics; the profile's run leaves params.yaml and the outputs as they were, its MLflow run is tagged
    with the experiment, and ``dvc exp apply`` brings it back."""
    from flows.pipeline import pipeline

    project = built
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    commit_all(project)
    params_before = (project / "params.yaml").read_bytes()
    evaluation_before = json.loads((project / "reports" / "evaluate.json").read_text())
    assert "majority" in evaluation_before["baselines"]

    plain = pipeline(root=str(project), experiment="plain", return_state=True)
    assert plain.is_completed(), plain.message
    assert [o["stage"] for o in plain.result() if o["ran"]] == []

    profile = yaml.safe_load(params_before)
    profile["evaluate"]["majority_baseline"] = False
    (project / "profile.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    profiled = pipeline(root=str(project), params_file="profile.yaml", experiment="profiled", return_state=True)
    assert profiled.is_completed(), profiled.message
    assert [o["stage"] for o in profiled.result() if o["ran"]] == ["evaluate", "register", "report"]

    # the workspace is as it was: params.yaml to the byte, the outputs matching its dvc.lock, the old figures
    assert (project / "params.yaml").read_bytes() == params_before
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert json.loads((project / "reports" / "evaluate.json").read_text()) == evaluation_before

    shown = experiments_shown(project)
    assert {"plain", "profiled"} <= set(shown)
    assert shown["plain"]["params"]["evaluate"]["majority_baseline"] is True
    assert shown["profiled"]["params"]["evaluate"]["majority_baseline"] is False
    assert "majority" in shown["plain"]["metrics"]["reports/evaluate.json"]["baselines"]
    assert "majority" not in shown["profiled"]["metrics"]["reports/evaluate.json"]["baselines"]
    assert shown["profiled"]["metrics"]["reports/evaluate.json"]["test"]["accuracy"] == \
        evaluation_before["test"]["accuracy"]  # the classifier did not change

    # the MLflow run the profile's register made: tagged with the experiment's name (by register, from
    # DVC_EXP_NAME as `dvc exp run` sets it for its stages, and by the flow) and its commit (by the flow)
    registered = shown["profiled"]["metrics"]["reports/register.json"]
    tags = mlflow_client(project).get_run(registered["run_id"]).data.tags
    assert tags["dvc_exp_name"] == "profiled" and tags["dvc_exp_ref"] == shown["profiled"]["rev"]

    sh("dvc", "exp", "apply", "profiled", cwd=project)
    assert yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["majority_baseline"] is False
    applied = json.loads((project / "reports" / "evaluate.json").read_text())  # DVC shows metrics without lists
    assert set(applied["baselines"]) == set(shown["profiled"]["metrics"]["reports/evaluate.json"]["baselines"])
    assert "majority" not in applied["baselines"]
    assert "up to date" in sh("dvc", "status", cwd=project).stdout


def test_a_run_with_every_optional_part_off_is_saved_as_an_experiment(built):
    """With every optional part off, some stages write nothing into their report folders (reports/optimize without
    the student and the pruned variant); those folders are uncached DVC outputs that git holds, and git keeps no
    empty folder, so ``dvc exp save`` failed ('output reports/optimize does not exist'). A folder a stage leaves
    empty holds a note saying why: the experiment is saved, with every uncached output in its commit."""
    from bertflow.experiments import save, uncached_outputs

    project = built
    commit_all(project)
    set_params(project, EVERY_PART_OFF)
    assert "optimize" in repro(project, "report")
    commit = save(project, "every-part-off")

    listed = sh("git", "ls-tree", "-r", "--name-only", commit, "--", "reports", cwd=project).stdout.splitlines()
    missing = [path for path in uncached_outputs(project)
               if path.startswith("reports/") and not any(f == path or f.startswith(path + "/") for f in listed)]
    assert missing == [], listed
    note = (project / "reports" / "optimize" / "EMPTY.md").read_text()
    assert "reports/optimize" in note and "params.yaml" in note
    assert [p.name for p in (project / "reports" / "optimize").iterdir()] == ["EMPTY.md"]
    shown = experiments_shown(project)
    assert shown["every-part-off"]["params"]["optimize"]["variants"] == []
    assert "up to date" in sh("dvc", "status", cwd=project).stdout


def test_a_queued_sweep_runs_on_the_imported_inputs(tmp_path):
    """``dvc exp run --queue -S tokenizer.vocab_size=100,120 tokenizer`` queues two experiments; ``--run-all`` runs
    them in DVC's temporary workspaces, which get the raw inputs from the DVC cache (a source outside the project
    that was not imported would not be there); ``dvc exp show`` lists both with their params and figures."""
    project, _ = imported_project(tmp_path)
    queued = sh("dvc", "exp", "run", "--queue", "-S", "tokenizer.vocab_size=100,120", "tokenizer", cwd=project)
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout
    sh("dvc", "exp", "run", "--run-all", cwd=project)
    shown = experiments_shown(project).values()
    assert sorted((e["params"]["tokenizer"]["vocab_size"], e["metrics"]["reports/tokenizer.json"]["vocab_size"])
                  for e in shown) == [(100, 100), (120, 120)]
    assert not (project / "data" / "corpus").exists()  # the workspace was not touched


def test_raw_inputs_come_back_from_the_remote_and_a_changed_source_is_imported_by_update(tmp_path):
    """The corpus is an import: its copy is in the DVC cache and on the remote, so when the source has changed and
    the copy and the cache are gone, ``dvc pull`` brings back the version the project recorded, not the changed
    source; ``dvc update`` then imports the change, and ingest re-runs on it."""
    from tests.flow.conftest import repro, write_docs

    project, source = imported_project(tmp_path)
    assert repro(project, "ingest") == ["ingest"]
    sh("dvc", "push", cwd=project)
    recorded = yaml.safe_load((project / "data" / "raw" / "corpus.dvc").read_text())["outs"][0]["md5"]
    original = (source / "corpus" / "a.txt").read_text()

    write_docs(source / "corpus", "b.txt", 100, 3)  # the source moves on
    shutil.rmtree(project / "data" / "raw" / "corpus")
    shutil.rmtree(project / ".dvc" / "cache")
    sh("dvc", "pull", "data/raw/corpus.dvc", "ingest", cwd=project)  # what was pushed: the inputs and ingest's outputs
    assert sorted(p.name for p in (project / "data" / "raw" / "corpus").iterdir()) == ["a.txt"]
    assert (project / "data" / "raw" / "corpus" / "a.txt").read_text() == original
    assert "up to date" in sh("dvc", "status", "ingest", cwd=project).stdout

    sh("dvc", "update", "data/raw/corpus.dvc", cwd=project)
    assert yaml.safe_load((project / "data" / "raw" / "corpus.dvc").read_text())["outs"][0]["md5"] != recorded
    assert repro(project, "ingest") == ["ingest"]


def test_restore_brings_back_the_inputs_a_recorded_run_read(tmp_path):
    """``bertflow restore`` of a run whose ingest read the corpus before its source moved on (and ``dvc update``
    imported the change): the import's .dvc file is pointed back at the recorded version and the files come back
    from the remote (the local cache lost them), with ``dvc status`` clean for the import and ingest. The run's
    restore data are recorded in the project's real MLflow store as the register stage records them."""
    from bertflow import tracking
    from bertflow.paths import Paths
    from tests.flow.conftest import repro, write_docs

    project, source = imported_project(tmp_path)
    assert repro(project, "ingest") == ["ingest"]
    sh("dvc", "push", cwd=project)
    original = (project / "data" / "raw" / "corpus" / "a.txt").read_text()
    recorded = (project / "data" / "raw" / "corpus.dvc").read_text()
    client = mlflow_client(project)
    experiment = client.create_experiment("restore-inputs", artifact_location=(project / "mlruns" / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    tracking.log_restore_data(client, run_id, Paths(project))
    commit_all(project, "ingest's outputs")

    write_docs(source / "corpus", "b.txt", 100, 3)
    sh("dvc", "update", "data/raw/corpus.dvc", cwd=project)
    assert repro(project, "ingest") == ["ingest"]
    commit_all(project, "the source moved on")
    evict(project, yaml.safe_load(recorded)["outs"][0]["md5"])  # the old corpus is left on the remote only

    restored = sh("bertflow", "restore", f"runs:/{run_id}", cwd=project)
    assert "raw inputs: data/raw/corpus.dvc pointed back at the versions the run read" in restored.stdout
    assert "data/raw/corpus fetched from the remote" in restored.stdout, restored.stdout
    assert sorted(p.name for p in (project / "data" / "raw" / "corpus").iterdir()) == ["a.txt"]
    assert (project / "data" / "raw" / "corpus" / "a.txt").read_text() == original
    assert yaml.safe_load((project / "data" / "raw" / "corpus.dvc").read_text()) == yaml.safe_load(recorded)
    status = sh("dvc", "status", "data/raw/corpus.dvc", "ingest", cwd=project).stdout
    assert "up to date" in status, status


def evict(project: Path, dir_md5: str) -> None:
    """Take a folder's version (its .dir object and every file it lists) out of the project's DVC cache."""
    def object_path(md5: str) -> Path:
        return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]

    listing = object_path(dir_md5)
    for entry in json.loads(listing.read_text()):
        object_path(entry["md5"]).unlink()
    listing.unlink()


def test_inputs_outside_the_project_are_named_and_hf_sources_are_not(tmp_path):
    """sync's inputs part: a source outside the project is only hashed by DVC, so the flow names it; an import under
    data/raw/ and an hf: source (a param with its pinned revision) are not named."""
    from bertflow.dvc_sync import unversioned_inputs
    from bertflow.params import load_params
    from tests.conftest import tiny_params, write_params

    project = tmp_path / "project"
    (project / "data" / "raw" / "corpus").mkdir(parents=True)  # as `dvc import-url` or `dvc pull` leave them
    params = tiny_params(tmp_path)  # corpus/ and the .tsv files beside the project, i.e. outside it
    shutil.copy(tmp_path / "corpus" / "a.txt", project / "data" / "raw" / "corpus")
    shutil.copy(tmp_path / "test.tsv", project / "data" / "raw" / "test.tsv")
    params["ingest"]["corpus"]["sources"] = [{"path": "data/raw/corpus"}, {"path": "../corpus"},
                                             {"path": "hf:wikitext:wikitext-2-raw-v1", "split": "train"}]
    params["ingest"]["labeled"] = {"train": "../train.tsv", "test": "data/raw/test.tsv"}
    settings = load_params(write_params(project, params)).ingest
    assert unversioned_inputs(settings, project) == ["../corpus", "../train.tsv"]


def test_experiment_names_are_sortable_ref_names():
    from bertflow.experiments import experiment_name

    assert experiment_name(1796616900.0) == "flow-20261207-041500"
