"""Each pipeline run as a DVC experiment, and the raw inputs DVC imported into ``data/raw/``.

The flow runs its stages with ``dvc repro --single-item`` (one Prefect task each) and then records the
workspace with ``dvc exp save``: ``dvc exp show`` lists the run with its params and metrics, ``dvc exp diff``
compares it, ``dvc exp apply`` brings its params, dvc.lock, reports and (from the DVC cache) its data back.
While the stages run, ``DVC_EXP_NAME`` holds the experiment's name, as ``dvc exp run`` sets it for its
stages, so the register stage tags the MLflow run with it whichever of the two started the run.

A run with a profile (``bertflow-flow run --profile params.tiny.yaml``) leaves the workspace as it found it,
as ``dvc exp run --temp`` does: params.yaml, dvc.yaml, dvc.lock, the import files, the uncached reports are
put back and ``dvc checkout`` brings back the cached outputs; the profile's run lives in its experiment.

Raw inputs are ``dvc import-url`` stages under ``data/raw/`` (``<name>.dvc``: the source's URL and hash, and
the copy in the DVC cache), so ``dvc checkout``, ``dvc pull``, ``dvc exp apply`` and ``bertflow restore``
bring back the exact files a run read. The flow ``dvc update``s them first (a changed source is imported
anew and ingest re-runs); ``dvc repro`` alone does not (imports are frozen until ``dvc update``).

Reads and writes: the project's git refs (``refs/exps/...``), the files named above, the DVC cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "DVC_EXP_NAME"  # the variable `dvc exp run` sets for its stages
RAW = Path("data") / "raw"  # where the imported raw inputs live
PROJECT_FILES = ("params.yaml", "dvc.yaml", "dvc.lock")


class ExperimentError(RuntimeError):
    """A DVC or git command about experiments or inputs failed; the message names the command and its error."""


# ---------------------------------------------------------------- names and files (pure)


def experiment_name(now: float | None = None) -> str:
    """``flow-20261207-041500``: sortable, one a second, a valid git ref name."""
    return "flow-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))


def imports(root: Path) -> list[str]:
    """The ``.dvc`` files of the imported raw inputs, relative to ``root``, sorted."""
    folder = root / RAW
    return sorted(p.relative_to(root).as_posix() for p in folder.rglob("*.dvc")) if folder.is_dir() else []


def uncached_outputs(root: Path) -> list[str]:
    """Every ``cache: false`` output dvc.yaml declares, the persisted reports of register and report included: the
    files that neither ``dvc checkout`` nor the DVC cache bring back. (The resume checkpoints under artifacts/ are
    no DVC output: large, gitignored, never part of what a run is.)"""
    import yaml

    document = yaml.safe_load((root / "dvc.yaml").read_text()) if (root / "dvc.yaml").is_file() else {}
    found = []
    for entry in (document.get("stages") or {}).values():
        for item in [item for kind in ("outs", "metrics", "plots") for item in entry.get(kind) or []]:
            path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
            if (options or {}).get("cache") is False:
                found.append(str(path))
    return found


# ---------------------------------------------------------------- commands (edges)


def command(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``args`` in ``root`` (dvc from this interpreter's scripts when it is there); a failure names its last line."""
    if args[0] == "dvc" and (Path(sys.executable).parent / "dvc").is_file():
        args = (str(Path(sys.executable).parent / "dvc"), *args[1:])
    result = subprocess.run(args, cwd=root, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if check and result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise ExperimentError(f"`{' '.join(['dvc', *args[1:]] if args[0].endswith('dvc') else args)}` failed: "
                              f"{lines[-1] if lines else f'exit {result.returncode}'}")
    return result


def has_commit(root: Path) -> bool:
    """Whether ``root`` is a git work tree with a commit (an experiment is a commit on top of one)."""
    return command(root, "git", "rev-parse", "--verify", "-q", "HEAD", check=False).returncode == 0


def untracked(root: Path, paths: list[str]) -> list[str]:
    """Those of ``paths`` that exist and git does not track (``dvc exp save`` leaves them out unless named)."""
    present = [p for p in paths if (root / p).exists()]
    if not present:
        return []
    listed = command(root, "git", "ls-files", "--others", "--exclude-standard", "--", *present).stdout.splitlines()
    return sorted({p for p in present if any(f == p or f.startswith(p.rstrip("/") + "/") for f in listed)})


def save(root: Path, name: str) -> str:
    """``dvc exp save --name`` with the uncached reports and the project files git does not track yet; returns the
    experiment's commit."""
    include = untracked(root, [*PROJECT_FILES, *uncached_outputs(root), *imports(root)])
    command(root, "dvc", "exp", "save", "--name", name, *[arg for path in include for arg in ("-I", path)])
    return ref(root, name)


def ref(root: Path, name: str) -> str:
    """The commit of experiment ``name`` (``refs/exps/<baseline>/<name>``)."""
    found = command(root, "git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}").stdout.split()
    if not found:
        raise ExperimentError(f"experiment {name}: no git ref refs/exps/*/*/{name} after `dvc exp save`")
    return found[0]


def update_inputs(root: Path) -> list[str]:
    """``dvc update`` every import under data/raw (a changed or missing copy is imported from its source); where a
    source is gone, the recorded version from the cache or the remote (``dvc pull``). Returns lines to log."""
    files = imports(root)
    if not files:
        return []
    result = command(root, "dvc", "update", *files, check=False)
    if result.returncode == 0:
        return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    pulled = command(root, "dvc", "pull", *files, check=False)
    if pulled.returncode != 0:
        raise ExperimentError(f"raw inputs {', '.join(files)}: `dvc update` failed "
                              f"({(result.stderr or result.stdout).strip().splitlines()[-1]}) and `dvc pull` too "
                              f"({(pulled.stderr or pulled.stdout).strip().splitlines()[-1]})")
    return [f"dvc update failed (a source is not there); the recorded versions of {', '.join(files)} were pulled"]


# ---------------------------------------------------------------- putting the workspace back (profile runs)


@dataclass
class Snapshot:
    """The files a profile run changes, as they were before it (None: the file was not there)."""
    files: dict[str, bytes | None] = field(default_factory=dict)
    folders: dict[str, Path | None] = field(default_factory=dict)
    keep: Path | None = None


def take_snapshot(root: Path) -> Snapshot:
    """params.yaml, dvc.yaml, dvc.lock, the import files and the uncached reports, copied aside (.dvc/tmp)."""
    import tempfile

    base = root / ".dvc" / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    snapshot = Snapshot(keep=Path(tempfile.mkdtemp(prefix="bertflow-snapshot-", dir=base)))
    for relative in [*PROJECT_FILES, *imports(root), *uncached_outputs(root)]:
        path = root / relative
        if path.is_dir():
            snapshot.folders[relative] = snapshot.keep / relative
            shutil.copytree(path, snapshot.keep / relative)
        elif path.is_file():
            snapshot.files[relative] = path.read_bytes()
        else:
            snapshot.files[relative] = None
    return snapshot


def put_back(root: Path, snapshot: Snapshot) -> list[str]:
    """The snapshot's files back as they were, then ``dvc checkout`` of the cached outputs; returns lines to log."""
    for relative, content in snapshot.files.items():
        path = root / relative
        if content is None:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.putback")
            partial.write_bytes(content)
            partial.replace(path)
    for relative, copy in snapshot.folders.items():
        shutil.rmtree(root / relative, ignore_errors=True)
        shutil.copytree(copy, root / relative)
    shutil.rmtree(snapshot.keep, ignore_errors=True)
    result = command(root, "dvc", "checkout", "--force", check=False)
    if result.returncode != 0:
        return [f"the workspace's params.yaml, dvc.yaml and dvc.lock are back, but `dvc checkout` could not bring "
                f"every output back: {(result.stderr or result.stdout).strip().splitlines()[-1]}"]
    return ["the workspace is as it was before the profile's run (params.yaml, dvc.yaml, dvc.lock, outputs)"]

