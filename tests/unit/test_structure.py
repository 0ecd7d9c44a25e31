"""The house rules: stages stand on the library, one stage registry, and dvc.yaml/params.yaml in step with the code."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from bertflow import dvc_sync, stages
from bertflow.io import InputError
from bertflow.params import Params, fill_defaults, load_params, missing_fields
from tests.conftest import REPO


def imported(path: Path) -> set[str]:
    """Dotted names of every module a file imports (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_stage_imports_another_stage_and_the_library_imports_no_stage():
    stage_modules = {f"tasks.{name}" for name in stages.PIPELINE}
    for name in stages.PIPELINE:
        others = {m for m in imported(REPO / "tasks" / f"{name}.py") if m.startswith("tasks")}
        assert not others, f"stage {name} imports {sorted(others)}"
    for path in sorted((REPO / "bertflow").glob("*.py")):
        upward = {m for m in imported(path) if m.split(".")[0] in ("tasks", "flows")}
        assert not upward, f"library module {path.name} imports {sorted(upward)}"
    # the CLI reaches stages only through the registry (importlib), never by a static import
    assert not imported(REPO / "tasks" / "cli.py") & stage_modules
    assert {p.stem for p in (REPO / "tasks").glob("*.py")} == {*stages.PIPELINE, "cli", "__init__"}


def dvc_document() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def path_of(item) -> str:
    return item if isinstance(item, str) else next(iter(item))


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/") or folder.startswith(path.rstrip("/") + "/")


def test_the_registry_is_a_topological_order_of_dvc_yaml():
    declared = dvc_document()["stages"]
    assert set(declared) == set(stages.PIPELINE)
    produced = {name: [path_of(o) for kind in ("outs", "metrics", "plots") for o in declared[name].get(kind) or []]
                for name in declared}
    edges = 0
    for consumer in stages.PIPELINE:
        for dep in declared[consumer].get("deps", []):
            for producer, outs in produced.items():
                if producer != consumer and any(within(dep, out) for out in outs):
                    edges += 1
                    assert stages.PIPELINE.index(producer) < stages.PIPELINE.index(consumer), \
                        f"{consumer} reads {dep} from {producer}, which the registry runs later"
    assert edges > 20  # the check saw the data flow, not an empty graph


def test_cli_flow_tracking_and_report_derive_from_the_registry():
    from bertflow import tracking
    from flows import pipeline
    from tasks import report
    from tasks.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert list(commands) == [*stages.PIPELINE, "sync-dvc", "predict", "restore"]
    assert pipeline.STAGES == stages.PIPELINE and pipeline.POOLED == ("pretrain", "finetune")
    assert tracking.STAGE_ORDER == stages.PIPELINE[:stages.PIPELINE.index("register")]
    assert report.REPORTED == stages.PIPELINE[:-1]
    params = dvc_document()["stages"]
    assert all(params[s.name]["params"] == list(s.params) for s in stages.STAGES)


def test_dvc_yaml_and_params_yaml_are_in_step_with_the_code():
    """What `bertflow sync-dvc` would write is what is committed: syncing a fresh clone changes nothing."""
    document = YAML().load((REPO / "dvc.yaml").read_text())
    assert not dvc_sync.sync_document(document, REPO, load_params(REPO / "params.yaml"))
    assert missing_fields(REPO / "params.yaml") == []
    check = subprocess.run([sys.executable, "-m", "tasks.cli", "--root", str(REPO), "sync-dvc", "--check"],
                           cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# One process imports the third-party libraries the stages use, then forks a child per stage that
# imports tasks.cli and the stage afresh and writes the project files it loaded: what Python really
# imports for each stage, for one import of torch and transformers instead of one per stage.
LOADED = r"""
import json, os, sys
from pathlib import Path
import numpy, pandas, pyarrow, tokenizers, torch, mlflow, sklearn.metrics, sklearn.linear_model
import sklearn.feature_extraction.text, transformers.models.bert.modeling_bert
out, packages, repo = Path(sys.argv[1]), sys.argv[2].split(","), Path.cwd().resolve()
for name in sys.argv[3:]:
    pid = os.fork()
    if pid == 0:
        import importlib
        importlib.import_module("tasks.cli")
        importlib.import_module(f"tasks.{name}")
        files = {Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
        ours = [f.relative_to(repo) for f in files if f.is_relative_to(repo)]
        (out / name).write_text(json.dumps(sorted(f.as_posix() for f in ours if f.parts[0] in packages)))
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0, f"importing tasks.{name} failed"
"""


@pytest.fixture(scope="session")  # a module fixture is set up again when xdist interleaves modules
def loaded(tmp_path_factory) -> dict[str, set[str]]:
    """Stage name -> the project files (bertflow/, tasks/, flows/; relative to the repository) its process loads."""
    out = tmp_path_factory.mktemp("loaded")
    subprocess.run([sys.executable, "-c", LOADED, str(out), ",".join(dvc_sync.PACKAGES), *stages.PIPELINE], cwd=REPO,
                   check=True, timeout=600)
    return {name: set(json.loads((out / name).read_text())) for name in stages.PIPELINE}


@pytest.mark.xdist_group("structure")  # one worker, so one importing process serves every stage
@pytest.mark.parametrize("name", stages.PIPELINE)
def test_every_stage_depends_on_every_project_module_it_loads(name, loaded):
    """The AST closure holds at least what Python really imports for the stage (and the lazy imports besides)."""
    assert f"tasks/{name}.py" in loaded[name]  # the child really imported the stage
    deps = set(dvc_document()["stages"][name]["deps"])
    assert loaded[name] <= deps, f"stage {name} loads {sorted(loaded[name] - deps)} without depending on them"
    assert {f"tasks/{name}.py", "tasks/cli.py", "bertflow/params.py"} <= deps


def test_import_closure_follows_lazy_relative_and_package_imports(tmp_path):
    (tmp_path / "bertflow").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "bertflow" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "bertflow" / "a.py").write_text("from . import b\n")
    (tmp_path / "bertflow" / "b.py").write_text("import json\n")
    (tmp_path / "bertflow" / "c.py").write_text("def f():\n    from bertflow.d import x\n")
    (tmp_path / "bertflow" / "d.py").write_text("x = 1\n")
    (tmp_path / "bertflow" / "unused.py").write_text("")
    (tmp_path / "tasks" / "cli.py").write_text("from bertflow import a\n")
    (tmp_path / "tasks" / "s.py").write_text("import bertflow.c\n")
    assert dvc_sync.code_deps(tmp_path, "s") == [
        "bertflow/__init__.py", "bertflow/a.py", "bertflow/b.py", "bertflow/c.py", "bertflow/d.py",
        "tasks/__init__.py", "tasks/cli.py", "tasks/s.py"]


def test_every_field_is_written_out_and_means_the_same():
    for name in ("params.yaml", "params.tiny.yaml", "params.zh.yaml"):
        raw = yaml.safe_load((REPO / name).read_text())
        validated = load_params(REPO / name)
        filled = copy.deepcopy(raw)
        added = fill_defaults(filled, validated)
        assert fill_defaults(copy.deepcopy(filled), validated) == []
        assert Params.model_validate(filled, context={"base_dir": REPO}) == validated, name
        if name != "params.yaml":
            assert added  # the profiles leave defaults to the code; sync fills them for DVC
    assert "pretrain.adam_betas" in added and "finetune.max_grad_norm" in added


def test_side_effect_stages_are_never_run_cached():
    """DVC does not run-cache (nor restore) a stage with a persist output; register and report have one."""
    declared = dvc_document()["stages"]
    for stage in stages.STAGES:
        options = [o[path_of(o)] or {} for kind in ("outs", "metrics") for o in declared[stage.name].get(kind) or []
                   if isinstance(o, dict)]
        if stage.side_effects:
            assert options and all(o.get("persist") for o in options), stage.name


def test_every_uncached_output_is_one_git_keeps():
    """An output DVC does not cache comes back on a clone only through git: were git to ignore it (the resume
    checkpoints once were such outputs), a fresh clone's `dvc pull` could not bring it, `dvc status` would name it
    deleted and `dvc repro` would rerun its stage (pretraining, 20 minutes) and everything after."""
    declared = dvc_document()["stages"]
    uncached = [path_of(o) for entry in declared.values() for kind in ("outs", "metrics", "plots")
                for o in entry.get(kind) or [] if isinstance(o, dict) and (o[path_of(o)] or {}).get("cache") is False]
    assert uncached
    probes = [probe for path in uncached for probe in (path, f"{path}/x")]  # x: a folder's pattern ("dir/")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert ignored == []


def test_a_local_checkpoint_is_a_dep_of_the_stages_that_read_it_and_an_hf_id_a_param(tmp_path):
    """pretrain.init names a folder: tokenizer and pretrain depend on it (sync-dvc writes it, a stage
    refuses to run without it); an hf: id is the param pretrain.init, which both stages declare."""
    checkpoint = tmp_path / "models" / "bert"
    checkpoint.mkdir(parents=True)
    params_yaml = tmp_path / "params.yaml"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pretrain"]["init"] = "models/bert"
    params["ingest"]["corpus"]["sources"] = [{"path": str(REPO.parent / "shared" / "data" / "pretrain_en")}]
    for split in ("train", "dev", "test"):
        params["ingest"]["labeled"][split] = str(REPO.parent / "shared" / "data" / "sst2" / f"{split}.tsv")
    params_yaml.write_text(yaml.safe_dump(params, sort_keys=False))
    for package in ("bertflow", "tasks", "flows"):
        (tmp_path / package).symlink_to(REPO / package)
    document = YAML().load((REPO / "dvc.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    loaded = load_params(params_yaml)
    with pytest.raises(InputError, match=r"models/bert"):  # the stale dvc.yaml is refused, naming the dep
        dvc_sync.check_stage(tmp_path / "dvc.yaml", params_yaml, loaded, "pretrain")
    assert dvc_sync.sync_document(document, tmp_path, loaded)
    readers = {name for name, entry in document["stages"].items() if "models/bert" in entry["deps"]}
    assert readers == {"tokenizer", "pretrain"}
    assert "pretrain.init" in document["stages"]["tokenizer"]["params"]  # pretrain declares all of pretrain
    assert "pretrain" in document["stages"]["pretrain"]["params"]
    params["pretrain"]["init"] = "hf:org/bert@0123abc"
    params_yaml.write_text(yaml.safe_dump(params, sort_keys=False))
    assert dvc_sync.sync_document(document, tmp_path, load_params(params_yaml))  # the folder dep goes again
    assert not any("models/bert" in entry["deps"] for entry in document["stages"].values())
