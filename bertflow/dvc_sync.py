"""Keeping dvc.yaml and params.yaml in step with the code and the params, so `dvc status` can be trusted.

``bertflow sync-dvc`` writes, from the code itself and the stage registry (bertflow/stages.py):
- each stage's code deps: the project files in its import closure (``tasks/cli.py``, which runs every
  stage, and ``tasks/<stage>.py``, with every project module they import, lazily or not, and the
  packages' ``__init__.py``), after its data deps;
- ingest's data deps: every local corpus source and labeled file of params.yaml, relative to the
  dvc.yaml folder as written (a symbolic link on the way is kept, not resolved); those under data/raw/ are
  ``dvc import-url`` copies, versioned in the DVC cache, and ``unversioned_inputs`` names the ones outside
  the project, which DVC only hashes;
- each stage's ``params`` (the sections it reads);
- each stage's timing outputs ``reports/timing/<stage>.json`` (and ``.csv``, the training stages' CPU and
  memory), ``cache: false``: outs, not metrics, so ``dvc metrics diff`` shows results only;
- ``persist: true`` on the outputs of stages with side effects (register, report): DVC never restores
  such a stage from its run-cache, so an old params value calls MLflow again;
- params.yaml with every field written out (defaults included), so DVC sees every value a stage uses.
``check_stage`` lets ``bertflow <stage>`` refuse to run when any of that is stale, naming what is missing.
Reads the code, params.yaml and dvc.yaml; writes dvc.yaml and params.yaml (sync only), atomically.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from ruamel.yaml import YAML

from bertflow import stages, timings
from bertflow.io import InputError
from bertflow.params import (
    HF_PREFIX,
    PRETRAINED,
    SCRATCH,
    IngestParams,
    Params,
    fill_defaults,
    load_params,
    missing_fields,
)

PACKAGES = ("bertflow", "tasks", "flows")  # the project's own code; everything else is a library
ENTRY = "tasks/cli.py"  # `bertflow <stage>`: it runs before, around and after every stage


# ---------------------------------------------------------------- the import closure (pure reading)


def module_file(root: Path, dotted: str) -> str | None:
    """``bertflow.io`` → ``bertflow/io.py`` (or a package's ``__init__.py``) under ``root``, if it is project code."""
    if dotted.split(".")[0] not in PACKAGES:
        return None
    base = Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / candidate).is_file():
            return candidate.as_posix()
    return None


def imported_modules(root: Path, relative: str) -> set[str]:
    """Dotted names of the modules a file imports anywhere in it (function-level imports included)."""
    tree = ast.parse((root / relative).read_text(encoding="utf-8"), filename=relative)
    package = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    if not relative.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def import_closure(root: Path, start: list[str]) -> list[str]:
    """Every project file reached from ``start`` by imports, with the ``__init__.py`` of each package on the way."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        relative = todo.pop()
        if relative in seen or not (root / relative).is_file():
            continue
        seen.add(relative)
        parts = Path(relative).parts
        todo += [Path(*parts[:depth], "__init__.py").as_posix() for depth in range(1, len(parts))]
        for dotted in imported_modules(root, relative):
            target = module_file(root, dotted)
            if target:
                todo.append(target)
    return sorted(seen)


def code_deps(root: Path, stage: str) -> list[str]:
    """The project files ``bertflow <stage>`` runs."""
    return import_closure(root, [ENTRY, f"tasks/{stage}.py"])


def is_code(dep: str) -> bool:
    return str(dep).split("/")[0] in PACKAGES


def data_deps(params: IngestParams, dvc_dir: Path) -> list[str]:
    """Local corpus sources and labeled files, relative to the dvc.yaml folder, in params order, as written."""
    paths = [source.path for source in params.corpus.sources if not source.is_hf]
    paths += [p for p in (params.labeled.train, params.labeled.dev, params.labeled.test) if p]
    return relative(paths, dvc_dir)


def unversioned_inputs(params: IngestParams, dvc_dir: Path) -> list[str]:
    """The local sources and labeled files outside the project: DVC hashes them as deps but never caches them,
    so neither ``dvc pull`` nor ``dvc exp apply`` can bring an old version back (``dvc import-url`` them into
    data/raw/ instead). ``hf:`` sources are params (a pinned revision), not files."""
    return [path for path in data_deps(params, dvc_dir) if path == ".." or path.startswith("../")]


def relative(paths: list[str], dvc_dir: Path) -> list[str]:
    return [os.path.relpath(path, os.path.abspath(dvc_dir)) for path in dict.fromkeys(paths)]


# the stages that read a checkpoint named in params, and the params key that names it
CHECKPOINT_READERS = {"tokenizer": "pretrain.init", "pretrain": "pretrain.init", "finetune": "finetune.init"}
PIPELINE_FOLDERS = ("data", "artifacts", "reports")  # where the stages' own outputs live


def checkpoint_deps(stage: str, params: Params, dvc_dir: Path) -> list[str]:
    """The local checkpoint folder a stage starts from (an hf: id is a param, its revision pinned there)."""
    key = CHECKPOINT_READERS.get(stage)
    if key is None:
        return []
    section, field = key.split(".")
    spec = getattr(getattr(params, section), field)
    return [] if spec in (SCRATCH, PRETRAINED) or spec.startswith(HF_PREFIX) else relative([spec], dvc_dir)


# ---------------------------------------------------------------- what dvc.yaml should say


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # keep long lines (the plots' column lists) as written
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml.representer.add_representer(float, _float)
    return yaml


def _float(representer, value: float):
    """Floats that every YAML reader takes as floats: PyYAML reads ``1e-06`` as a string, ``1.0e-06`` as a float."""
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        text = text.replace("e", ".0e", 1)
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _maps(node) -> list:
    """Every ruamel mapping in a loaded document, outermost first."""
    if isinstance(node, list):
        return [found for item in node for found in _maps(item)]
    if not hasattr(node, "ca") or not isinstance(node, dict):
        return []
    return [node, *[found for value in node.values() for found in _maps(value)]]


def _move_trailing_comment(node, old_keys: list) -> None:
    """Keys appended to a ruamel map land after the blank lines and comments that ended it; move those
    (not the last old key's own end-of-line comment) below the new keys, so sections stay apart."""
    keys = list(node)
    if not old_keys or keys[-1] == old_keys[-1]:
        return
    slots = node.ca.items.get(old_keys[-1])
    token = slots[2] if slots and len(slots) > 2 else None
    if token is None or "\n" not in token.value:
        return
    own, rest = token.value.split("\n", 1)
    if not rest:
        return
    from ruamel.yaml.tokens import CommentToken

    token.value = own + "\n"
    node.ca.items.setdefault(keys[-1], [None, None, None, None])[2] = CommentToken("\n" + rest, token.start_mark)


def _stage_entry(document: dict, name: str, dvc_yaml: Path) -> dict:
    try:
        return document["stages"][name]
    except (KeyError, TypeError):
        raise InputError(f"{dvc_yaml}: no stage {name!r} (bertflow/stages.py lists it)") from None


def wanted_deps(entry: dict, stage: str, root: Path, params: Params) -> list[str]:
    """Data deps first (ingest's from params; the others' outputs of earlier stages as written, then a
    checkpoint named in params), then the code deps."""
    written = [str(dep) for dep in entry.get("deps", [])]
    if stage == "ingest":
        return data_deps(params.ingest, root) + code_deps(root, stage)
    pipeline = [d for d in written if d.split("/")[0] in PIPELINE_FOLDERS]
    return pipeline + checkpoint_deps(stage, params, root) + code_deps(root, stage)


def _outputs(entry: dict) -> list[dict]:
    """The option maps of a stage's outs/metrics/plots, turning bare paths into ``{path: {}}`` in place."""
    found = []
    for kind in ("outs", "metrics", "plots"):
        items = entry.get(kind) or []
        for index, item in enumerate(items):
            if isinstance(item, str):
                items[index] = item = {item: {}}
            for path, options in item.items():
                if options is None:
                    item[path] = options = {}
                found.append(options)
    return found


def timing_outs(stage: str) -> list[str]:
    """A stage's timing files (bertflow/timings.py): outputs, not metrics, so `dvc metrics diff` shows results."""
    return [f"reports/timing/{stage}.json"] + ([f"reports/timing/{stage}.csv"] if stage in timings.SAMPLED else [])


def missing_outs(entry: dict, stage: str) -> list[str]:
    declared = {path for kind in ("outs", "metrics", "plots") for item in entry.get(kind) or []
                for path in ([item] if isinstance(item, str) else item)}
    return [path for path in timing_outs(stage) if path not in declared]


def sync_document(document: dict, root: Path, params: Params) -> bool:
    """Bring every stage's deps, params, timing outputs and persistence in line; True when something changed."""
    changed = False
    dvc_yaml = root / "dvc.yaml"
    for stage in stages.STAGES:
        entry = _stage_entry(document, stage.name, dvc_yaml)
        missing = missing_outs(entry, stage.name)
        if missing:
            outs = entry.get("outs")
            if outs is None:
                entry["outs"] = outs = []
            outs.extend({path: {"cache": False}} for path in missing)
            changed = True
        deps = wanted_deps(entry, stage.name, root, params)
        if [str(d) for d in entry.get("deps", [])] != deps:
            entry["deps"] = deps
            changed = True
        if [str(p) for p in entry.get("params", [])] != list(stage.params):
            entry["params"] = list(stage.params)
            changed = True
        if stage.side_effects:
            for options in _outputs(entry):
                if options.get("persist") is not True:
                    options["persist"] = True
                    changed = True
    return changed


# ---------------------------------------------------------------- the edges: write, check


def _write_atomically(path: Path, yaml: YAML, document) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    os.replace(tmp, path)


def write_resolved_params(params_yaml: Path) -> list[str]:
    """Write every field params.yaml leaves to its default into it (comments and order kept); returns them."""
    yaml = _yaml()
    document = yaml.load(params_yaml.read_text(encoding="utf-8"))
    before = [(node, list(node)) for node in _maps(document)]
    added = fill_defaults(document, load_params(params_yaml))
    for node, old_keys in before:
        _move_trailing_comment(node, old_keys)
    if added:
        _write_atomically(params_yaml, yaml, document)
    return added


def sync_dvc_yaml(dvc_yaml: Path, params_yaml: Path | None = None) -> list[Path]:
    """``bertflow sync-dvc``: params.yaml resolved, then dvc.yaml's deps, params and persistence.

    Returns the files it changed.
    """
    params_yaml = params_yaml or dvc_yaml.with_name("params.yaml")
    added = write_resolved_params(params_yaml)
    yaml = _yaml()
    document = yaml.load(dvc_yaml.read_text(encoding="utf-8"))
    before = [(node, list(node)) for node in _maps(document)]
    changed = sync_document(document, dvc_yaml.parent, load_params(params_yaml))
    for node, old_keys in before:
        _move_trailing_comment(node, old_keys)
    if changed:
        _write_atomically(dvc_yaml, yaml, document)
    return [path for path, edited in ((params_yaml, added), (dvc_yaml, changed)) if edited]


def stale_entries(dvc_yaml: Path, params: Params, stage: str) -> list[str]:
    """What dvc.yaml misses for ``stage``: deps (code or data) and params sections, each named."""
    entry = _stage_entry(_yaml().load(dvc_yaml.read_text(encoding="utf-8")), stage, dvc_yaml)
    declared = {os.path.normpath(str(d)) for d in entry.get("deps", [])}
    wanted = wanted_deps(entry, stage, dvc_yaml.parent, params)
    problems = [f"dep {dep}" for dep in wanted if os.path.normpath(dep) not in declared]
    problems += [f"out {path}" for path in missing_outs(entry, stage)]
    declared_params = {str(p) for p in entry.get("params", [])}
    problems += [f"params {section}" for section in stages.BY_NAME[stage].params if section not in declared_params]
    return problems


def check_stage(dvc_yaml: Path, params_yaml: Path, params: Params, stage: str) -> None:
    """Refuse to run ``stage`` when dvc.yaml or params.yaml would hide a change from `dvc repro`."""
    problems = stale_entries(dvc_yaml, params, stage)
    if problems:
        raise InputError(f"{dvc_yaml}: stage {stage} does not depend on {', '.join(problems)}, so `dvc repro` "
                         "would miss changes to them; run `bertflow sync-dvc`")
    unwritten = missing_fields(params_yaml, params)
    if unwritten:
        raise InputError(f"{params_yaml}: {', '.join(unwritten)} left to defaults in code, where DVC cannot see "
                         "them; run `bertflow sync-dvc` to write every field out")
