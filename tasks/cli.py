"""The ``bertflow`` command: one subcommand per stage, as dvc.yaml calls them.

Reads the params file (``--params``, default params.yaml) and runs one stage's ``run`` with its
own section; writes what that stage writes plus ``reports/<stage>.json``. Bad params or bad input
exit with status 2 and one message naming the thing at fault. With ``distributed`` asking for more
than one process, the training stages re-run this same command line under torchrun (rank 0 writes).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from bertflow import distributed
from bertflow.dvc_sync import check_dvc_deps, sync_dvc_yaml
from bertflow.io import InputError, write_json
from bertflow.params import ParamsError, load_params
from bertflow.paths import Paths

STAGES = {
    "ingest": "read sources and labeled data into data/corpus and data/labeled",
    "tokenizer": "train the WordPiece vocabulary into artifacts/tokenizer",
    "lm_baselines": "bigram (Kneser-Ney) and LSTM language models: held-out perplexity over the word pieces",
    "pretrain_data": "build NSP pairs and MLM masks into data/pretrain",
    "pretrain": "pretrain BERT (MLM + NSP) into artifacts/pretrained",
    "finetune": "fine-tune the classifier into artifacts/classifier (+ the random-init ablation)",
    "evaluate": "test-set figures, held-out MLM figures and baselines into reports/evaluate",
    "attention": "attention of a chosen token, per layer and head, pretrained vs fine-tuned, into reports/attention",
    "optimize": "int8, ONNX, distilled and pruned variants of the classifier, measured, into artifacts/optimized",
    "register": "track the run in MLflow and register the classifier (challenger/champion)",
    "report": "one self-contained HTML page of the run into reports/report.html (and its MLflow run)",
}
DISTRIBUTED = ("pretrain", "finetune")  # the stages that run under torchrun when params ask for it


def run_stage(stage: str, params_file: str | Path = "params.yaml", root: str | Path = ".",
              overrides: dict | None = None) -> dict:
    """Validate the whole params file, run one stage on its own section, write its report."""
    params = load_params(params_file, overrides)
    paths = Paths(Path(root))
    dvc_yaml = paths.root / "dvc.yaml"
    uses_dvc_params = Path(params_file).resolve() == (paths.root / "params.yaml").resolve()
    if stage == "ingest" and dvc_yaml.is_file() and uses_dvc_params:
        check_dvc_deps(dvc_yaml, params)
    module = importlib.import_module(f"tasks.{stage}")
    section = params if getattr(module, "WHOLE_PARAMS", False) else getattr(params, stage)
    figures = module.run(section, paths)
    if distributed.is_main_process():
        write_json(paths.report(stage), figures)
    return figures


def launch_distributed(stage: str, params_file: str, argv: list[str]) -> None:
    """Become torchrun re-running this command line when params ask for more than one process.

    The process turns into torchrun (exec, the same pid), so whoever started ``bertflow`` (dvc, the
    flow, a shell) waits on torchrun itself, and a signal to it, even SIGKILL, reaches the ranks
    (they end with their parent: ``distributed.follow_launcher``). Returns only when not launching.
    """
    if stage not in DISTRIBUTED:
        return
    params = load_params(params_file)
    settings = params.distributed
    if not distributed.wants_launch(settings):
        return
    chosen = distributed.check_launch(settings, getattr(params, stage).device, f"{stage}.device")
    command = distributed.launch_command(settings, argv)
    logging.getLogger(__name__).info("%s (%s): %s", stage, chosen, " ".join(command))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(command[0], command, distributed.launch_env(settings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertflow", description="bertflow pipeline stages")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root holding data/, artifacts/, reports/")
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for stage, help_text in STAGES.items():
        commands.add_parser(stage, help=help_text)
    commands.add_parser("sync-dvc", help="write ingest's deps in dvc.yaml from the sources in params.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "sync-dvc":
            sync_dvc_yaml(Path(args.root) / "dvc.yaml", load_params(args.params))
            return 0
        launch_distributed(args.command, args.params, argv)
        run_stage(args.command, args.params, args.root)
    except (ParamsError, InputError) as exc:
        print(f"bertflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
