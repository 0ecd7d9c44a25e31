"""DVC sees every change: a one-line edit of any project module, or of any value a default used to hide.

The project's dvc.lock is recorded over placeholder outputs (``dvc commit``), so `dvc status` compares
real hashes of the real code without running the stages; these tests only ask DVC what changed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from bertflow import stages
from bertflow.params import load_params
from tests.flow.conftest import sh


def placeholder_outputs(project: Path) -> None:
    for entry in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics"):
            for item in entry.get(kind) or []:
                path = project / (item if isinstance(item, str) else next(iter(item)))
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("x\n")
    for entry in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for dep in entry.get("deps", []):  # files read from inside another stage's output folder
            if not (project / dep).exists():
                (project / dep).write_text("{}\n")


@pytest.fixture
def recorded(project):
    placeholder_outputs(project)
    sh("dvc", "commit", "--force", "--quiet", cwd=project)
    assert changed_stages(project) == set()
    return project


def changed_stages(project: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {name.split(":")[-1] for name in repo.status()}


def declared_deps(project: Path) -> dict[str, list[str]]:
    return {name: entry.get("deps", []) for name, entry in yaml.safe_load((project / "dvc.yaml").read_text())
            ["stages"].items()}


def test_a_one_line_change_to_any_module_re_runs_exactly_the_stages_that_import_it(recorded):
    deps = declared_deps(recorded)
    modules = sorted(p.relative_to(recorded).as_posix() for folder in ("bertflow", "tasks")
                     for p in (recorded / folder).glob("*.py"))
    assert len(modules) > 30
    for module in modules:
        path = recorded / module
        original = path.read_bytes()
        path.write_bytes(original + b"# one line more\n")
        try:
            expected = {name for name, listed in deps.items() if module in listed}
            assert changed_stages(recorded) == expected, module
        finally:
            path.write_bytes(original)
    narrow = {m: {n for n, listed in deps.items() if m in listed} for m in ("bertflow/pairs.py", "tasks/evaluate.py",
                                                                             "bertflow/pages.py")}
    assert narrow == {"bertflow/pairs.py": {"pretrain_data"}, "tasks/evaluate.py": {"evaluate"},
                      "bertflow/pages.py": {"report"}}


def test_a_changed_default_is_seen_by_dvc_status(recorded):
    """Section by section: a field left to its default in code is written out by sync-dvc (dvc.lock still
    holds), and changing it then makes `dvc status` list exactly the stages that read that section."""
    from bertflow.dvc_sync import write_resolved_params

    params_yaml = recorded / "params.yaml"
    params, validated = yaml.safe_load(params_yaml.read_text()), load_params(params_yaml)
    for stage in stages.STAGES:
        key, value = first_default(getattr(validated, stage.params[0]), stage.params[0])
        sparse = copy.deepcopy(params)
        _delete(sparse, key)
        params_yaml.write_text(yaml.safe_dump(sparse, sort_keys=False))
        assert write_resolved_params(params_yaml) == [key]
        assert changed_stages(recorded) == set(), key
        edited = copy.deepcopy(params)
        _set(edited, key, _other(value))
        params_yaml.write_text(yaml.safe_dump(edited, sort_keys=False))
        readers = {s.name for s in stages.STAGES if any(key == p or key.startswith(p + ".") for p in s.params)}
        assert stage.name in readers and changed_stages(recorded) == readers, key
    params_yaml.write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed_stages(recorded) == set()


def first_default(model, prefix: str) -> tuple[str, object]:
    """The first scalar field of ``model`` (depth first) that holds its default from the code, else the
    first list that does (attention's sentences)."""
    from pydantic import BaseModel

    fields = type(model).model_fields.items()
    lists = [(f"{prefix}.{name}", model.model_dump(mode="json")[name]) for name, field in fields
             if isinstance(getattr(model, name), list) and getattr(model, name) == field.get_default(
                 call_default_factory=True)]
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found = first_default(value, f"{prefix}.{name}")
            if found:
                return found
        elif not field.is_required() and isinstance(value, bool | int | float | str) and \
                value == field.get_default(call_default_factory=True):
            return f"{prefix}.{name}", value
    return lists[0] if lists else None


def test_stale_files_are_refused_before_any_work(recorded):
    dvc_yaml = (recorded / "dvc.yaml").read_text()
    (recorded / "dvc.yaml").write_text(dvc_yaml.replace("      - bertflow/pairs.py\n", ""))
    result = sh("bertflow", "pretrain_data", cwd=recorded, check=False)
    assert result.returncode == 2
    assert "stage pretrain_data does not depend on dep bertflow/pairs.py" in result.stderr
    assert "run `bertflow sync-dvc`" in result.stderr
    assert sh("bertflow", "sync-dvc", "--check", cwd=recorded, check=False).returncode == 1
    sh("bertflow", "sync-dvc", cwd=recorded)
    assert (recorded / "dvc.yaml").read_text() == dvc_yaml

    params = yaml.safe_load((recorded / "params.yaml").read_text())
    del params["finetune"]["max_grad_norm"]
    (recorded / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = sh("bertflow", "finetune", cwd=recorded, check=False)
    assert result.returncode == 2 and "finetune.max_grad_norm left to defaults in code" in result.stderr
    sh("bertflow", "sync-dvc", cwd=recorded)
    assert yaml.safe_load((recorded / "params.yaml").read_text())["finetune"]["max_grad_norm"] == 1.0


def test_a_data_folder_behind_a_symbolic_link_keeps_its_written_path(project, tmp_path):
    disk = tmp_path / "other-disk"
    (disk / "data").mkdir(parents=True)
    os.replace(project / "corpus", disk / "data" / "corpus")
    os.replace(project / "train.tsv", disk / "data" / "train.tsv")
    (tmp_path / "shared").symlink_to(disk)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["corpus"]["sources"][0]["path"] = "../shared/data/corpus"
    params["ingest"]["labeled"]["train"] = "../shared/data/train.tsv"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("bertflow", "sync-dvc", cwd=project)
    deps = declared_deps(project)["ingest"]
    assert deps[:2] == ["../shared/data/corpus", "../shared/data/train.tsv"]
    assert "other-disk" not in (project / "dvc.yaml").read_text()
    out = sh("dvc", "repro", "ingest", cwd=project).stdout
    assert "Running stage 'ingest'" in out
    assert (project / "data" / "corpus" / "train.parquet").is_file()


def _get(mapping: dict, dotted: str):
    for part in dotted.split("."):
        mapping = mapping[int(part)] if isinstance(mapping, list) else mapping[part]
    return mapping


def _set(mapping: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        mapping = mapping[int(part)] if isinstance(mapping, list) else mapping[part]
    mapping[int(leaf) if isinstance(mapping, list) else leaf] = value


def _delete(mapping: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        mapping = mapping[part]
    del mapping[leaf]


def _other(value):
    """A different value of the same type that still validates (for the fields picked here)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, list):
        return value + value[:1]
    return value + "x"
