"""Pretraining throughput with 1 and with N processes (torchrun + DDP), the pretrain stage itself.

Each run is ``bertflow pretrain`` on a scratch copy of the default profile's ``data/pretrain`` and
``artifacts/tokenizer``, for ``--steps`` optimizer steps with the default profile's global batch;
the process counts alternate (1, N, 1, N, …) so machine noise hits them alike. Tokens/s is the
stage's own figure (non-padding tokens of all processes over training seconds, without start-up).
On a 2-core machine two processes share the same two cores (one thread each instead of two), so
the figure measures DDP's overhead here, not a scale-out; the command for a bigger node is
printed beside it.

Reads: ``params.yaml``, ``data/pretrain``, ``artifacts/tokenizer``. Writes: a temp folder and
``benchmarks/results/distributed.{json,md}``.

    python benchmarks/distributed.py [--processes 2] [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import ensure_output, machine, machine_line, write_results  # noqa: E402
from bertflow.params import write_params_copy  # noqa: E402
from bertflow.paths import Paths  # noqa: E402
from bertflow.timings import read_stage_report  # noqa: E402

BIGGER_NODE = ("# a node with 8 GPUs: in params.yaml (device auto: rank r on cuda:r, nccl between them)\n"
             "distributed: {nproc_per_node: 8}\n"
             "# then, as always:\n"
             "dvc repro pretrain   # or: bertflow pretrain, or the Prefect flow\n"
             "# two such nodes: nnodes: 2, rdzv_endpoint: <head-host>:29400, and the same command on both\n"
             "# a 32-core CPU node instead: nproc_per_node: 4 with pretrain.device: cpu (8 threads each, gloo)")


def scratch_params(folder: Path, processes: int, steps: int) -> Path:
    return write_params_copy(REPO / "params.yaml", folder / f"params-{processes}.yaml", {
        "pretrain": {"max_steps": steps, "budget_minutes": None, "eval_every": 10 * steps, "eval_instances": 64,
                     "checkpoint_every_minutes": None},
        "distributed": {"nproc_per_node": processes}})


def pretrain_once(processes: int, steps: int, scratch: Path) -> dict:
    root = scratch / f"run-{processes}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "artifacts").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "pretrain").symlink_to(REPO / "data" / "pretrain")
    (root / "artifacts" / "tokenizer").symlink_to(REPO / "artifacts" / "tokenizer")
    params = scratch_params(scratch, processes, steps)
    subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(params), "--root", str(root), "pretrain"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    report = read_stage_report(Paths(root), "pretrain")  # results and timings (seconds)
    return {"tokens": report["tokens"], "seconds": report["seconds"], "threads": report["threads"]}


def markdown(result: dict) -> str:
    lines = [f"# Pretraining with torchrun + DDP ({machine_line(result['machine'])})", "",
             f"The pretrain stage, default profile (BERT-Mini, global batch {result['global_batch']}), "
             f"{result['args']['steps']} steps per run, {result['args']['rounds']} alternating rounds.", "",
             "| processes | threads each | tokens/s | vs 1 process |", "|---|---|---|---|"]
    base = result["runs"]["1"]["tokens_per_second"]
    for processes, run in result["runs"].items():
        lines.append(f"| {processes} | {run['threads']} | {run['tokens_per_second']:,} | "
                     f"{run['tokens_per_second'] / base:.2f} |")
    lines += ["", "On a bigger node, or several:", "", "```", BIGGER_NODE, "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ensure_output("pretrain_data", REPO / "data" / "pretrain" / "info.json")
    totals: dict[int, dict] = {1: {"tokens": 0, "seconds": 0.0}, args.processes: {"tokens": 0, "seconds": 0.0}}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        for _ in range(args.rounds):
            for processes in totals:
                run = pretrain_once(processes, args.steps, Path(tmp))
                print(json.dumps({"processes": processes, **run}), flush=True)
                totals[processes] = {"tokens": totals[processes]["tokens"] + run["tokens"],
                                     "seconds": totals[processes]["seconds"] + run["seconds"],
                                     "threads": run["threads"]}
    runs = {str(n): {"tokens_per_second": round(t["tokens"] / t["seconds"]), "threads": t["threads"]}
            for n, t in totals.items()}
    result = {"machine": machine(), "args": vars(args), "runs": runs,
              "global_batch": yaml.safe_load((REPO / "params.yaml").read_text())["pretrain"]["batch_size"]}
    write_results("distributed", result, markdown(result))


if __name__ == "__main__":
    main()
