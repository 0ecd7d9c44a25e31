"""Benchmark of the data stages (ingest → tokenizer → pretrain_data) on the default corpus.

Reads params.yaml (or --params) and its sources; writes a scratch root (default: a temp folder),
``benchmarks/results/data_stages.json`` and ``benchmarks/results/data_stages.md``.
Each stage runs as its own ``bertflow`` process, so wall time and peak memory include start-up,
exactly as ``dvc repro`` pays them. pretrain_data runs once per ``--num-proc`` value to show what
the worker processes buy. Not a test: run it with ``make bench-data`` or
``python benchmarks/data_stages.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, machine_line, write_results  # noqa: E402
from bertflow.paths import Paths  # noqa: E402
from bertflow.timings import read_stage_report  # noqa: E402


def timed_stage(stage: str, params: Path, root: Path, overrides: list[str] = ()) -> dict:
    """Run one stage in a child process; returns wall seconds, peak RSS and the stage's report."""
    code = ("import sys; from tasks.cli import run_stage; "
            f"run_stage({stage!r}, {str(params)!r}, {str(root)!r}, dict(a.split('=', 1) for a in sys.argv[1:]))")
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *overrides], cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"stage {stage} failed with status {status}")
    report = read_stage_report(Paths(root), stage)  # results and timings (mb_per_second, seconds)
    return {"wall_seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "report": report}


def source_mb(report: dict) -> float:
    corpus = report["corpus"]
    return (corpus["train"]["characters"] + corpus["heldout"]["characters"]) / 1e6


def markdown(result: dict) -> str:
    rows = ["| stage | wall s | peak RSS MB | throughput |", "|---|---|---|---|"]
    for name, stage in result["stages"].items():
        rows.append(f"| {name} | {stage['wall_seconds']} | {stage['peak_rss_mb']} | {stage['throughput']} |")
    return (f"# Data stages on {result['corpus_mb']:.1f} M characters ({machine_line(result['machine'])})\n\n"
            + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--root", default=None, help="scratch project root (default: a temp folder)")
    parser.add_argument("--num-proc", default="1,2", help="pretrain_data worker counts to compare")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-data-"))
    params = Path(args.params).resolve()
    stages = {}
    ingest = timed_stage("ingest", params, root)
    mb = source_mb(ingest["report"])
    stages["ingest"] = {**ingest, "throughput": f"{mb / ingest['wall_seconds']:.2f} M chars/s"}
    tokenizer = timed_stage("tokenizer", params, root)
    stages["tokenizer"] = {**tokenizer, "throughput": f"{mb / tokenizer['wall_seconds']:.2f} M chars/s"}
    for n in [int(n) for n in args.num_proc.split(",")]:
        run = timed_stage("pretrain_data", params, root, [f"pretrain_data.num_proc={n}"])
        instances = run["report"]["train"]["instances"] + run["report"]["heldout"]["instances"]
        stages[f"pretrain_data (num_proc={n})"] = {
            **run, "throughput": f"{run['report']['mb_per_second']} MB/s, {instances / run['wall_seconds']:.0f} inst/s"}
    result = {
        "machine": machine(),
        "params": str(params.relative_to(REPO) if params.is_relative_to(REPO) else params),
        "corpus_mb": mb,
        "stages": stages,
    }
    write_results("data_stages", result, markdown(result))


if __name__ == "__main__":
    main()
