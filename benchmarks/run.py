"""All the performance benchmarks in one command, and the headline table the README shows.

Runs, one after the other as child processes of this one: ``data_stages.py`` (ingest → tokenizer →
pretrain_data on the default corpus), ``pretraining.py`` (bertflow's pretraining step beside the
reference, matmul peaks, ablation, profile), ``classifier.py`` (fine-tuning throughput, the
registry-served classifier's latency and throughput), ``variants.py`` (the optimize stage's variants
as served, beside the transformers pipeline), ``serving.py`` (``mlflow models serve`` under concurrent
load, @champion and @fast, beside the in-process pyfunc and the pipeline) and ``distributed.py`` (the
pretrain stage with 1 and 2 torchrun processes). Each writes ``benchmarks/results/<name>.{json,md}``;
this script then writes ``benchmarks/results/performance.md`` (the headline figures and every
table) and puts the headline table into README.md between its ``benchmarks`` markers.

    make bench        # or: python benchmarks/run.py [--skip data_stages,...]

Measures the default profile's outputs. What a benchmark needs and the project lacks (a fresh clone) it
builds first through DVC (``benchmarks.common.ensure_output``: ``dvc repro pretrain_data`` for pretraining
and DDP, ``dvc repro optimize`` for the variants, i.e. the pipeline up to optimize, about 90 minutes on 2
cores); what ``make run`` or ``dvc repro`` already built is used as it is. The benchmarks themselves take
about 20 minutes on 2 CPU cores (19 min 26 s on 2026-12-07).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine_line  # noqa: E402

BENCHMARKS = ("data_stages", "pretraining", "classifier", "variants", "serving", "distributed")
README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def run_benchmark(name: str) -> None:
    print(f"== {name}", flush=True)
    subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py")], cwd=REPO, check=True)


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def serving_rows(serving: dict) -> list[str]:
    """The REST server at 8 clients (single texts) for @champion and @fast, and the in-process batch-1 race."""
    rows = {(r["side"], r["clients"], r["batch"]): r for r in serving["rows"]}
    weights = ", random weights" if "random weights" in serving["model"] else ""
    pyfunc, pipeline = rows[("in-process pyfunc @champion", 1, 1)], rows[("in-process transformers pipeline "
                                                                          "(champion)", 1, 1)]
    lines = [f"| in-process, batch 1, p50 ms: pipeline vs pyfunc @champion{weights} | {pipeline['p50_ms']} | "
             f"{pyfunc['p50_ms']} | {pipeline['p50_ms'] / pyfunc['p50_ms']:.2f}× |"]
    for alias in ("champion", "fast"):
        rest, local = rows[(f"REST @{alias}", 8, 1)], rows[(f"in-process pyfunc @{alias}", 1, 1)]
        ratio = rest["requests_per_second"] / local["texts_per_second"]
        lines.append(f"| REST @{alias}{weights}, 8 clients, single texts: requests/s (p50 / p99 ms, failed) vs "
                     f"in-process texts/s | {local['texts_per_second']} | {rest['requests_per_second']} "
                     f"({rest['p50_ms']} / {rest['p99_ms']}, {rest['failed']}) | {ratio:.2f}× |")
    return lines


def trainer_rows(mini: dict, ft: dict) -> list[str]:
    """The competitor a user would pick, transformers.Trainer with its speed options, in the reference column:
    BERT-Mini/30522 pretraining (tokens/s, MFU) and fine-tuning (tokens/s, as issue 22's targets count it)."""
    pre, tune = mini["transformers.Trainer"], ft["transformers.Trainer"]
    return [f"| pretraining BERT-Mini/30522 against transformers.Trainer, tokens/s (MFU of the bf16 peak) | "
            f"{pre['tokens_per_second']:,} ({pre['mfu_vs_bf16_peak']:.1%}) | {mini['bertflow']['tokens_per_second']:,} "
            f"({mini['bertflow']['mfu_vs_bf16_peak']:.1%}) | {mini['vs_trainer']}× |",
            f"| fine-tuning against transformers.Trainer, tokens/s (batch {ft['batch_size']}) | "
            f"{tune['tokens_per_second']:,} | {ft['bertflow']['tokens_per_second']:,} | {ft['vs_trainer']}× |"]


def headline(pre: dict, cls: dict, data: dict, ddp: dict, variants: dict, serving: dict) -> str:
    """The figures the targets are about, in one table."""
    rows = {(r["config"], r["vocab_size"]): r for r in pre["rows"]}
    mini = rows[("BERT-Mini", 30522)]
    ft, sv = cls["finetuning"], cls["serving"]
    stages = data["stages"]
    data_seconds = sum(s["wall_seconds"] for name, s in stages.items() if "num_proc=1" not in name)
    lines = [f"Measured on {machine_line(pre['machine'])}; "
             f"matmul peak fp32 {pre['peaks']['fp32']:.0f}, bf16 {pre['peaks']['bf16']:.0f} GFLOP/s.", "",
             "| figure | reference | bertflow | ratio |", "|---|---|---|---|"]
    for (config, vocab), r in rows.items():
        lines.append(f"| pretraining {config}, vocab {vocab}, tokens/s | {r['reference']['tokens_per_second']:,} | "
                     f"{r['bertflow']['tokens_per_second']:,} | {r['speedup']}× |")
    lines += [
        f"| pretraining BERT-Mini/30522, MFU (of the fp32 / bf16 peak) | {mini['reference']['mfu_vs_fp32_peak']:.1%} | "
        f"{mini['bertflow']['mfu_vs_bf16_peak']:.1%} | |",
        f"| fine-tuning, sequences/s (batch {ft['batch_size']}) | {ft['reference']['sequences_per_second']} | "
        f"{ft['bertflow']['sequences_per_second']} | {ft['speedup']}× |",
        *trainer_rows(mini, ft),
        f"| served classifier, latency p50 / p99 at batch 1 (ms) | {sv['reference']['p50_ms']} / "
        f"{sv['reference']['p99_ms']} | {sv['bertflow']['p50_ms']} / {sv['bertflow']['p99_ms']} | |",
        f"| served classifier, texts/s at batch 64 | {sv['reference']['batch64_texts_per_second']} | "
        f"{sv['bertflow']['batch64_texts_per_second']} | |",
        f"| data stages (ingest + tokenizer + pretrain_data), {data['corpus_mb']:.0f} M chars, s | | "
        f"{data_seconds:.0f} | |"]
    sides = variants["sides"]
    reference = sides["reference (transformers pipeline)"]
    for name, row in sides.items():
        if name.startswith("reference"):
            continue
        lines.append(f"| served {name}, texts/s at batch 1 (p50 ms; test accuracy {row.get('accuracy', '?')}) | "
                     f"{reference['throughput_b1']} ({reference['latency_p50_ms_b1']}) | {row['throughput_b1']} "
                     f"({row['latency_p50_ms_b1']}) | {row['throughput_b1'] / reference['throughput_b1']:.2f}× |")
    lines += serving_rows(serving)
    one, many = ddp["runs"]["1"], ddp["runs"][str(ddp["args"]["processes"])]
    lines.append(f"| pretrain stage, 1 process vs {ddp['args']['processes']} DDP processes (same cores), tokens/s | "
                 f"{one['tokens_per_second']:,} | {many['tokens_per_second']:,} | "
                 f"{many['tokens_per_second'] / one['tokens_per_second']:.2f}× |")
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        print(f"README.md has no {README_START} … {README_END} markers; table not placed", file=sys.stderr)
        return
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    readme.write_text(f"{before}{README_START}\n{table}{README_END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to reuse from results/ instead")
    args = parser.parse_args()
    skip = {name for name in args.skip.split(",") if name}
    for name in BENCHMARKS:
        if name not in skip:
            run_benchmark(name)
    results = {name: load(name) for name in BENCHMARKS}
    table = headline(results["pretraining"], results["classifier"], results["data_stages"], results["distributed"],
                     results["variants"], results["serving"])
    sections = [(RESULTS / f"{name}.md").read_text() for name in ("pretraining", "classifier", "variants", "serving",
                                                                   "distributed", "data_stages")]
    (RESULTS / "performance.md").write_text("# Performance\n\n" + table + "\n" + "\n".join(sections))
    update_readme(table)
    print(table)


if __name__ == "__main__":
    main()
