"""``bertflow restore <model uri>``: bring a project back to the data and artifacts a registered version was built from.

Reads: the version (``models:/<name>/<version>``, ``models:/<name>@<alias>``) or run (``runs:/<run id>``) in the
registry (``$MLFLOW_TRACKING_URI``, else params.yaml's ``register.tracking_uri``, else the embedded one under
``--root``), and the run's artifacts ``restore/`` that the register stage recorded (bertflow/tracking.py):
``dvc.lock`` and ``params.yaml`` as they stood while register ran, and ``outs/<path>``, the outputs dvc.yaml
keeps out of the DVC cache (reports, curves); then the DVC cache, else the default DVC remote.
Writes, in the project: ``params.yaml``; ``dvc.lock`` with the recorded entries of every stage before
register (register's and report's are left out: they run after the version is made, and DVC cannot bring
back their side effects); each raw input imported under data/raw (``<name>.dvc``, ``dvc import-url``)
pointed back at the version ingest read (the hash dvc.lock recorded for it); the cached outputs of those
stages and the inputs, by ``dvc checkout`` (after ``dvc fetch`` of what the cache lacks); the uncached
reports, from the run. Each file is written whole (temporary file, then rename). It then asks ``dvc status``
whether the outputs match dvc.lock, and prints what it restored and the git commit of the code (``git
checkout`` it for the code too).

It overwrites the work tree's dvc.lock, params.yaml and import files, so it refuses when git does not hold
them as they are (uncommitted changes, or no git checkout) unless ``--force``. Refusals exit 2 with one line
naming the thing at fault and change nothing (``RestoreError``): a bad URI, an unknown version or run, a
registry that does not answer, a version registered before restore data was recorded, a project that is not
a DVC repository, outputs that are in neither the DVC cache nor the remote (named).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from bertflow import experiments, stages, tracking
from bertflow.paths import Paths

RESTORED_STAGES = stages.before("register")  # what a version is built from; register and report come after
PROJECT_FILES = ("dvc.lock", "params.yaml")


class RestoreError(Exception):
    """What is wrong or not there, in one line; the command exits 2 and nothing was changed."""


@dataclass(frozen=True)
class Target:
    uri: str
    name: str = ""
    version: str = ""
    alias: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class Source:
    """The run a version was registered from, and what it says about itself."""
    label: str  # "tiny v3", or "run <id>"
    run_id: str
    git_commit: str
    git_dirty: str
    lock_md5: str


# ---------------------------------------------------------------- what to restore (pure)


def parse_uri(uri: str) -> Target:
    """``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``runs:/<run id>[/...]``."""
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").strip("/").split("/")[0]
        if run_id:
            return Target(uri, run_id=run_id)
    elif uri.startswith("models:/"):
        rest = uri.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            if name and alias and "/" not in name + alias:
                return Target(uri, name=name, alias=alias)
        else:
            name, _, version = rest.partition("/")
            if name and version.isdigit():
                return Target(uri, name=name, version=version)
    raise RestoreError(f"{uri}: not a model URI; give models:/<name>/<version>, models:/<name>@<alias> or "
                       "runs:/<run id>")


def restored_lock(text: str) -> str:
    """The recorded dvc.lock with the entries of the stages before register only."""
    lock = yaml.safe_load(text) or {}
    entries = lock.get("stages") or {}
    lock["stages"] = {name: entry for name, entry in entries.items() if name in RESTORED_STAGES}
    return yaml.safe_dump(lock, sort_keys=False)


def input_versions(lock_text: str) -> dict[str, dict]:
    """``{path: {md5, size, nfiles}}`` of the ingest deps a recorded dvc.lock names (the raw inputs it read)."""
    entry = ((yaml.safe_load(lock_text) or {}).get("stages") or {}).get("ingest") or {}
    return {dep["path"]: dep for dep in entry.get("deps") or [] if "path" in dep and "md5" in dep}


def pointed_back(document: dict, folder: str, versions: dict[str, dict]) -> bool:
    """An import's .dvc document set to the version ``versions`` has for its output (its source dep too: an
    import's copy hashes as its source did); False when it already is, or the run did not read it."""
    out = (document.get("outs") or [{}])[0]
    recorded = versions.get(Path(folder, str(out.get("path", ""))).as_posix())
    if recorded is None or recorded["md5"] == out.get("md5"):
        return False
    for entry in [out, *(document.get("deps") or [])[:1]]:
        for key in ("md5", "size", "nfiles"):
            if key in recorded:
                entry[key] = recorded[key]
            else:
                entry.pop(key, None)
    document.pop("md5", None)  # the stage's own checksum, computed anew (stage_checksum)
    return True


def changed(status: dict) -> tuple[dict[str, str], list[str]]:
    """``dvc status --json`` as ({output: its state}, [deps that differ from dvc.lock, with their stage])."""
    outs, deps = {}, []
    for stage, problems in status.items():
        for problem in problems if isinstance(problems, list) else []:
            if not isinstance(problem, dict):
                continue
            outs.update(problem.get("changed outs") or {})
            deps += [f"{path} ({stage}: {state})" for path, state in (problem.get("changed deps") or {}).items()]
    return outs, deps


# ---------------------------------------------------------------- the registry (edge)


def open_registry(root: Path):
    """(client, uri) of the registry: ``$MLFLOW_TRACKING_URI``, else params.yaml's, else the embedded one."""
    from mlflow import MlflowClient

    configured = None
    try:
        configured = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("register", {}).get("tracking_uri")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    uri = tracking.tracking_uri(configured, Paths(root))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise RestoreError(f"no registry at {uri} (nothing registered from {root}); set MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a registry that does not answer: fail soon
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a few small files; one line on error
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def asking(uri: str, registry: str, call):
    """``call()``, its MLflow or connection failure as one line naming the URI or the registry."""
    from mlflow.exceptions import MlflowException

    from bertflow.registry import redact

    try:
        return call()
    except (MlflowException, OSError) as exc:
        text = getattr(exc, "message", None) or str(exc)
        if any(sign in text for sign in ("Max retries exceeded", "Connection refused", "timed out")):
            raise RestoreError(f"{uri}: the registry at {redact(registry)} did not answer") from None
        raise RestoreError(f"{uri}: {text.strip().splitlines()[0]} (registry {redact(registry)})") from None


def find_source(client, target: Target, registry: str) -> Source:
    """The run behind ``target``, refusing one that recorded nothing to restore from."""
    label, run_id = f"run {target.run_id}", target.run_id
    if target.name:
        version = asking(target.uri, registry, lambda: client.get_model_version_by_alias(target.name, target.alias)
                         if target.alias else client.get_model_version(target.name, target.version))
        label = f"{target.name} v{version.version}"
        run_id = version.tags.get("mlflow_run_id") or version.run_id
    run = asking(target.uri, registry, lambda: client.get_run(run_id))
    recorded = {item.path for item in asking(target.uri, registry,
                                             lambda: client.list_artifacts(run_id, tracking.RESTORE_FOLDER))}
    if f"{tracking.RESTORE_FOLDER}/dvc.lock" not in recorded:
        raise RestoreError(f"{target.uri}: {label} was registered before restore data was recorded (run {run_id} "
                           f"has no {tracking.RESTORE_FOLDER}/dvc.lock); git checkout "
                           f"{run.data.tags.get('git_commit', '<its commit>')} and re-run the pipeline instead")
    tags = run.data.tags
    return Source(label, run_id, tags.get("git_commit", "unknown"), tags.get("git_dirty", "unknown"),
                  tags.get(tracking.RESTORE_LOCK_TAG, ""))


def download(client, source: Source, folder: Path, uri: str, registry: str) -> Path:
    """The run's ``restore/`` folder, its dvc.lock checked against the md5 recorded with it."""
    local = Path(asking(uri, registry, lambda: client.download_artifacts(source.run_id, tracking.RESTORE_FOLDER,
                                                                         str(folder))))
    digest = hashlib.md5((local / "dvc.lock").read_bytes()).hexdigest()
    if source.lock_md5 and digest != source.lock_md5:
        raise RestoreError(f"{uri}: the recorded dvc.lock has md5 {digest}, not {source.lock_md5} as its tag says")
    return local


# ---------------------------------------------------------------- the project (edge)


def check_project(root: Path) -> None:
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        raise RestoreError(f"{root}: not a DVC repository with a dvc.yaml (no .dvc/ or dvc.yaml); give the "
                           "project with --root")


def check_saved(root: Path) -> None:
    """Refuse when git does not hold dvc.lock and params.yaml as they are (restore overwrites them)."""
    result = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *overwritten(root)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RestoreError(f"{root}: not a git checkout, so nothing keeps the dvc.lock and params.yaml that restore "
                           "would overwrite; pass --force to overwrite them anyway")
    unsaved = [line[3:] for line in result.stdout.splitlines() if line.strip()]
    if unsaved:
        raise RestoreError(f"{', '.join(unsaved)}: not committed as they are, and restore would overwrite them; "
                           "commit them (git keeps them) or pass --force")


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    command = [str(Path(sys.executable).with_name("dvc")), *args]
    if not Path(command[0]).is_file():
        command[0] = "dvc"
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def dvc_status(root: Path) -> dict:
    result = dvc(root, "status", "--json", *targets(root))
    if result.returncode != 0:
        raise RestoreError(f"dvc status failed: {last_line(result)}")
    return json.loads(result.stdout or "{}")


def restorable(root: Path) -> list[str]:
    """The stages of the project's dvc.lock that restore writes (those before register)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    return [name for name in lock.get("stages") or {} if name in RESTORED_STAGES]


def targets(root: Path) -> list[str]:
    """What restore asks DVC about: the restored stages and the imports of the raw inputs (their .dvc files)."""
    return restorable(root) + experiments.imports(root)


def overwritten(root: Path) -> list[str]:
    """The files restore writes: dvc.lock, params.yaml and the imports' .dvc files."""
    return [*PROJECT_FILES, *experiments.imports(root)]


def restore_inputs(root: Path, lock_text: str) -> list[str]:
    """Point each import under data/raw at the version the recorded ingest read; returns the .dvc files changed
    (``dvc checkout`` then brings the files themselves)."""
    versions, changed_files = input_versions(lock_text), []
    for relative in experiments.imports(root):
        document = yaml.safe_load((root / relative).read_text()) or {}
        if pointed_back(document, Path(relative).parent.as_posix(), versions):
            write_whole(root / relative, yaml.safe_dump(document, sort_keys=False).encode())
            stage_checksum(root, relative)
            changed_files.append(relative)
    return changed_files


def stage_checksum(root: Path, relative: str) -> None:
    """The .dvc file's own ``md5`` computed by DVC (as ``dvc update`` writes it), so ``dvc status`` finds it intact."""
    from dvc.repo import Repo
    from dvc.stage.utils import compute_md5

    with Repo(str(root)) as repo:
        stage = repo.stage.load_one(relative)
        stage.md5 = compute_md5(stage)
        stage.dump()


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {result.returncode}"


def write_whole(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.restoring")
    partial.write_bytes(content)
    partial.replace(path)


def put_back(root: Path, saved: dict[str, bytes | None]) -> None:
    """dvc.lock and params.yaml as they were before restore touched them."""
    for name, content in saved.items():
        if content is None:
            (root / name).unlink(missing_ok=True)
        else:
            write_whole(root / name, content)


def bring_outputs(root: Path) -> str:
    """Fetch what the DVC cache lacks (refusing, with the paths, what the remote lacks too), then check out."""
    missing = sorted(path for path, state in changed(dvc_status(root))[0].items() if state == "not in cache")
    how = "from the DVC cache"
    if missing:
        fetched = dvc(root, "fetch", *targets(root))
        still = sorted(path for path, state in changed(dvc_status(root))[0].items() if state == "not in cache")
        if still:
            why = "no default DVC remote" if "no remote" in last_line(fetched).lower() else "nor on the DVC remote"
            raise RestoreError(f"{', '.join(still)}: not in the DVC cache {why}; the version's outputs cannot be "
                               "brought back")
        how = f"from the DVC cache, {', '.join(missing)} fetched from the remote"
    # the imports with --force: a file of a newer import that the cache lacks is a copy of its source, which
    # `dvc update` imports again; DVC would otherwise stop to ask before deleting it
    runs = [restorable(root)] + ([["--force", *experiments.imports(root)]] if experiments.imports(root) else [])
    for args in runs:
        result = dvc(root, "checkout", *args)
        if result.returncode != 0:
            raise RuntimeError(f"dvc checkout failed: {last_line(result)}")
    return how


def write_uncached(root: Path, recorded: Path) -> list[str]:
    """The recorded uncached outputs (reports, curves) into the project, each file written whole."""
    written = []
    for relative in tracking.uncached_outputs(root / "dvc.yaml", tuple(restorable(root))):
        source, target = recorded / "outs" / relative, root / relative
        if not source.exists():
            continue
        if source.is_dir():
            if target.is_dir():
                shutil.rmtree(target)
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_whole(target, source.read_bytes())
        written.append(relative)
    return written


# ---------------------------------------------------------------- the command


def restore(uri: str, root: Path, force: bool = False) -> list[str]:
    """Restore the version ``uri`` names into ``root``; returns the lines of what was done."""
    target = parse_uri(uri)
    check_project(root)
    client, registry = open_registry(root)
    source = find_source(client, target, registry)
    if not force:
        check_saved(root)
    with tempfile.TemporaryDirectory() as folder:
        recorded = download(client, source, Path(folder), uri, registry)
        saved = {name: (root / name).read_bytes() if (root / name).is_file() else None for name in overwritten(root)}
        lock_text = (recorded / "dvc.lock").read_text()
        write_whole(root / "dvc.lock", restored_lock(lock_text).encode())
        if (recorded / "params.yaml").is_file():
            write_whole(root / "params.yaml", (recorded / "params.yaml").read_bytes())
        try:
            inputs = restore_inputs(root, lock_text)
            how = bring_outputs(root)
        except BaseException:
            put_back(root, saved)
            raise
        reports = write_uncached(root, recorded)
    return summary(root, source, how, reports, inputs)


def summary(root: Path, source: Source, how: str, reports: list[str], inputs: list[str] = ()) -> list[str]:
    """What was restored, and what ``dvc status`` says of it now."""
    outs, deps = changed(dvc_status(root))
    commit = source.git_commit + (" (it had uncommitted changes)" if source.git_dirty == "true" else "")
    lines = [f"restored {source.label} (MLflow run {source.run_id}) into {root.resolve()}",
             f"  dvc.lock: the entries of {', '.join(restorable(root))} (md5 of the recorded lock {source.lock_md5})",
             "  params.yaml: as the run had it",
             f"  raw inputs: {inputs_line(root, inputs)}",
             f"  outputs: {how}",
             f"  reports DVC does not cache, from the run: {', '.join(reports) or 'none'}",
             "  not restored: register and report (they run after the version is made); `dvc repro` would "
             "register these outputs again as a new version",
             f"  code: git commit {commit}; `git checkout {source.git_commit} -- bertflow tasks flows` for the code"]
    if outs:
        lines.append(f"  dvc status: outputs that do not match dvc.lock: "
                     f"{', '.join(f'{p} ({s})' for p, s in sorted(outs.items()))}")
    else:
        lines.append("  dvc status: every output matches dvc.lock")
    if deps:
        lines.append(f"  deps that differ from the version's (code or sources: git checkout the commit): "
                     f"{', '.join(deps)}")
    return lines


def inputs_line(root: Path, inputs: list[str]) -> str:
    if not experiments.imports(root):
        return "none imported under data/raw (DVC only hashed them: they cannot be brought back)"
    if inputs:
        return f"{', '.join(inputs)} pointed back at the versions the run read, and checked out"
    return f"{', '.join(experiments.imports(root))} as the run read them"


def run(uri: str, root: Path, force: bool = False) -> int:
    """``bertflow restore``; returns the exit code (2 with one line on standard error for a refusal, 1 when the
    restored outputs do not match dvc.lock)."""
    try:
        lines = restore(uri, root, force)
    except RestoreError as exc:
        print(f"bertflow restore: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 1 if any(line.startswith("  dvc status: outputs that do not match") for line in lines) else 0
