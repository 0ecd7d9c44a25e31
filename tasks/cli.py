"""The ``bertflow`` command: one subcommand per stage, as dvc.yaml calls them.

Reads the params file (``--params``, default params.yaml) and runs one stage's ``run`` with its
own section; writes what that stage writes plus ``reports/<stage>.json`` (its results) and
``reports/timing/<stage>.json`` (its seconds, start and end; bertflow/timings.py). Bad params or bad input
exit with status 2 and one message naming the thing at fault. With ``distributed`` asking for more
than one process, the training stages re-run this same command line under torchrun (rank 0 writes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from bertflow import launch, lifeline, timings
from bertflow.dvc_sync import check_stage, stale_entries, sync_dvc_yaml
from bertflow.io import InputError
from bertflow.outcome import BAD_INPUT, FAILED, SUCCEEDED, write_outcome
from bertflow.params import ParamsError, load_params
from bertflow.paths import Paths
from bertflow.stages import BY_NAME, STAGES


def run_stage(stage: str, params_file: str | Path = "params.yaml", root: str | Path = ".",
              overrides: dict | None = None) -> dict:
    """Validate the whole params file, run one stage on its own section, write its report."""
    params = load_params(params_file, overrides)
    paths = Paths(Path(root))
    dvc_yaml = paths.root / "dvc.yaml"
    uses_dvc_params = Path(params_file).resolve() == (paths.root / "params.yaml").resolve()
    if dvc_yaml.is_file() and uses_dvc_params:
        check_stage(dvc_yaml, Path(params_file), params, stage)
    entry = BY_NAME[stage]
    module = importlib.import_module(entry.module)
    section = params if entry.whole_params else getattr(params, stage)
    start_ms, main = timings.now_ms(), launch.is_main_process()
    with (timings.sampling(timings.system_path(paths, stage)) if main and stage in timings.SAMPLED
          else contextlib.nullcontext()):
        figures = module.run(section, paths)
    if main:
        timings.write_stage_reports(paths, stage, figures, start_ms, timings.now_ms())
    return figures


def launch_distributed(stage: str, params_file: str, argv: list[str]) -> None:
    """Become torchrun re-running this command line when params ask for more than one process.

    The process turns into torchrun (exec, the same pid), so whoever started ``bertflow`` (dvc, the
    flow, a shell) waits on torchrun itself, and a signal to it, even SIGKILL, reaches the ranks
    (they end with their parent: ``launch.follow_launcher``). Returns only when not launching.
    """
    if not BY_NAME[stage].distributed:
        return
    params = load_params(params_file)
    settings = params.distributed
    if not launch.wants_launch(settings):
        return
    chosen = launch.check_launch(settings, getattr(params, stage).device, f"{stage}.device")
    command = launch.launch_command(settings, argv)
    logging.getLogger(__name__).info("%s (%s): %s", stage, chosen, " ".join(command))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(command[0], command, launch.launch_env(settings))


def sync_or_check(root: Path, check: bool) -> int:
    """``bertflow sync-dvc [--check]`` on the project's own params.yaml and dvc.yaml (the files DVC reads)."""
    from bertflow.params import missing_fields

    dvc_yaml, params_yaml = root / "dvc.yaml", root / "params.yaml"
    if not check:
        changed = sync_dvc_yaml(dvc_yaml, params_yaml)
        print(f"bertflow sync-dvc: updated {', '.join(map(str, changed))}" if changed else
              f"bertflow sync-dvc: {dvc_yaml} and {params_yaml} already in step with the code")
        return 0
    params = load_params(params_yaml)
    problems = [f"{name}: {problem}" for name in BY_NAME for problem in stale_entries(dvc_yaml, params, name)]
    problems += [f"params.yaml leaves {key} to its default" for key in missing_fields(params_yaml, params)]
    for problem in problems:
        print(f"bertflow sync-dvc: stale: {problem}", file=sys.stderr)
    return 1 if problems else 0


PARAMS_HELP = "params file (default: params.yaml)"
ROOT_HELP = "project root holding data/, artifacts/, reports/ (default: .)"


def package_version() -> str:
    """The installed bertflow's version (pyproject.toml's, through the package metadata)."""
    try:
        return metadata.version("bertflow")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def common_options(with_params: bool = True) -> argparse.ArgumentParser:
    """``--params``/``--root`` for after the command's name (``bertflow ingest --params x.yaml``). Their defaults are
    left out (SUPPRESS), so one given before the name stands unless given again after it."""
    options = argparse.ArgumentParser(add_help=False)
    if with_params:
        options.add_argument("--params", default=argparse.SUPPRESS, help=PARAMS_HELP)
    options.add_argument("--root", default=argparse.SUPPRESS, help=ROOT_HELP)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertflow", description="bertflow pipeline stages; --params and --root "
                                     "go before or after the stage's name")
    parser.add_argument("--version", action="version", version=f"bertflow {package_version()}")
    parser.add_argument("--params", default="params.yaml", help=PARAMS_HELP)
    parser.add_argument("--root", default=".", help=ROOT_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for stage in STAGES:
        commands.add_parser(stage.name, help=stage.help, parents=[common_options()])
    sync = commands.add_parser("sync-dvc", help="write every field into params.yaml, and dvc.yaml's deps (the code "
                               "each stage imports, ingest's sources) and params from the code and params.yaml",
                               parents=[common_options(with_params=False)])
    sync.add_argument("--check", action="store_true", help="change nothing; exit 1 when either file is stale")
    add_predict(commands)
    add_restore(commands)
    return parser


def add_predict(commands) -> None:
    """``bertflow predict`` (bertflow/predict.py, imported only when it runs: the stages never load it)."""
    predict = commands.add_parser(
        "predict", parents=[common_options(with_params=False)],
        help="classify texts with a registered model or a model folder (label, scores, truncated)",
        description="Classify texts with the registered classifier or any form of it. Exit 2 with one message "
                    "for a model, registry, file or column that is not there, or a text the model refuses.")
    predict.add_argument("texts", nargs="*", help="texts to classify (none: --input, else standard input)")
    predict.add_argument("--model", "-m", required=True,
                         help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run>/<path>, or a folder "
                              "(a classifier or variant folder, or a logged MLflow model)")
    predict.add_argument("--input", "-i", help="a .txt (one text per line), .csv, .tsv or .jsonl file; - for stdin")
    predict.add_argument("--text-column", default="text", help="the texts' column in .csv/.tsv/.jsonl (default text)")
    predict.add_argument("--format", "-f", choices=("table", "jsonl", "csv"), default="table",
                         help="table (default), jsonl or csv")
    predict.add_argument("--output", "-o", help="write here instead of standard output (written whole, or not at all)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar on long inputs")


def add_restore(commands) -> None:
    """``bertflow restore`` (bertflow/restore.py, imported only when it runs, like predict)."""
    restore = commands.add_parser(
        "restore", parents=[common_options(with_params=False)],
        help="bring back the data, artifacts, dvc.lock and params.yaml a registered version was built from",
        description="Bring the project (--root) back to what a registered version was built from: writes the "
                    "dvc.lock and params.yaml recorded with its MLflow run over the work tree's (so it refuses "
                    "when git does not hold those two as they are: commit first, or pass --force), then its "
                    "outputs with dvc checkout (dvc fetch first for what the cache lacks) and the reports DVC does "
                    "not cache from the run, and checks them with dvc status. Prints the git commit of the code. "
                    "Exit 2 with one line, changing nothing, for a bad URI, an unknown version, a registry that "
                    "does not answer, a version registered before restore data was recorded, a project that is "
                    "not a DVC repository, or outputs in neither the DVC cache nor the remote.")
    restore.add_argument("model", help="models:/<name>/<version>, models:/<name>@<alias> or runs:/<run id>")
    restore.add_argument("--force", action="store_true",
                         help="overwrite dvc.lock and params.yaml even when git does not hold them as they are")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "predict":  # loaded by name, as the stages are: no stage's process (or DVC dep) has it
        predict = importlib.import_module("bertflow.predict")
        return predict.run(args.model, args.texts, args.input, args.text_column, args.format, args.output,
                           Path(args.root), progress=not args.no_progress)
    if args.command == "restore":  # loaded by name too
        return importlib.import_module("bertflow.restore").run(args.model, Path(args.root), args.force)
    if args.command == "sync-dvc":
        try:
            return sync_or_check(Path(args.root), args.check)
        except (ParamsError, InputError) as exc:
            print(f"bertflow sync-dvc: error: {exc}", file=sys.stderr)
            return 2
    return run_command(args.command, args.params, args.root, argv)


def run_command(stage: str, params_file: str, root: str, argv: list[str]) -> int:
    """``bertflow <stage>``: run it (under torchrun when params ask), leave its outcome record, return the exit code."""
    lifeline.follow_flow()
    try:
        launch_distributed(stage, params_file, argv)
        run_stage(stage, params_file, root)
    except (ParamsError, InputError) as exc:
        print(f"bertflow {stage}: error: {exc}", file=sys.stderr)
        record(stage, BAD_INPUT, 2, exc)
        return 2
    except BaseException as exc:  # recorded, then raised as ever: the traceback and exit code stay Python's
        record(stage, FAILED, 1, exc if str(exc) else RuntimeError(repr(exc)))
        raise
    record(stage, SUCCEEDED, 0)
    return 0


def record(stage: str, status: str, exit_code: int, error: BaseException | None = None) -> None:
    """The outcome record, from rank 0 only (every rank computes the same, and one writer per file)."""
    if launch.is_main_process():
        write_outcome(stage, status, exit_code, error)


if __name__ == "__main__":
    sys.exit(main())
