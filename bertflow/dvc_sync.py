"""Keeping dvc.yaml's ingest deps in step with the sources listed in params.yaml.

DVC cannot interpolate a list into ``deps``, so ``bertflow sync-dvc`` writes the ingest stage's
data deps (every local corpus source and labeled file) into dvc.yaml, keeping its code deps
(``tasks/...``) and comments. ``check_dvc_deps`` lets ``bertflow ingest`` refuse to run when
dvc.yaml misses a source, since ``dvc repro`` would then not see changes to it.
Reads params and dvc.yaml; writes dvc.yaml (sync only).
"""

from __future__ import annotations

import os
from pathlib import Path

from ruamel.yaml import YAML

from bertflow.io import InputError
from bertflow.params import IngestParams, Params

CODE_PREFIX = "tasks/"


def data_deps(params: IngestParams, dvc_dir: Path) -> list[str]:
    """Local corpus sources and labeled files, relative to the dvc.yaml folder, in params order."""
    paths = [source.path for source in params.corpus.sources if not source.is_hf]
    paths += [p for p in (params.labeled.train, params.labeled.dev, params.labeled.test) if p]
    return [os.path.relpath(path, dvc_dir.resolve()) for path in dict.fromkeys(paths)]


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _ingest_deps(document: dict, dvc_yaml: Path) -> list:
    try:
        return document["stages"]["ingest"]["deps"]
    except (KeyError, TypeError):
        raise InputError(f"{dvc_yaml}: no stages.ingest.deps list") from None


def sync_dvc_yaml(dvc_yaml: Path, params: Params) -> bool:
    """Rewrite the ingest stage's data deps; returns True when dvc.yaml changed."""
    yaml = _yaml()
    document = yaml.load(dvc_yaml.read_text(encoding="utf-8"))
    deps = _ingest_deps(document, dvc_yaml)
    wanted = data_deps(params.ingest, dvc_yaml.parent) + [d for d in deps if str(d).startswith(CODE_PREFIX)]
    if [str(d) for d in deps] == wanted:
        return False
    deps[:] = wanted
    tmp = dvc_yaml.with_name(f".{dvc_yaml.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    os.replace(tmp, dvc_yaml)
    return True


def check_dvc_deps(dvc_yaml: Path, params: Params) -> None:
    """Fail when dvc.yaml's ingest stage does not depend on every local source in params."""
    document = _yaml().load(dvc_yaml.read_text(encoding="utf-8"))
    declared = {os.path.normpath(str(d)) for d in _ingest_deps(document, dvc_yaml)}
    missing = [p for p in data_deps(params.ingest, dvc_yaml.parent) if os.path.normpath(p) not in declared]
    if missing:
        raise InputError(f"{dvc_yaml}: stage ingest does not depend on {missing} from params.yaml, so "
                         "`dvc repro` would miss changes to them; run `bertflow sync-dvc`")
