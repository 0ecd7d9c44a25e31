"""The classifier's faster variants (``bertflow optimize``) beside the reference, in one interleaved run.

The reference is transformers' ``text-classification`` pipeline on ``artifacts/classifier`` (fp32,
every class's probability). Beside it: the fp32 classifier and every variant under
``artifacts/optimized/`` as the registry serves them (``bertflow.serving.open_model``: tokenize, run,
softmax), timed by the optimize stage's own ``measure_speed``: batch-1 latency over SST-2 test
sentences and texts/s in calls of 64, in rounds that take the sides in turn, each round starting
one further along. Accuracy and macro-F1 are the optimize stage's figures (reports/optimize.json).

Then, unless ``--skip-runtimes``, benchmarks/runtimes.py: ONNX Runtime's fusions fused vs unfused, torchao's
int8 vs torch.ao's, on the same token ids (``benchmarks/results/runtimes.{json,md}``).

Reads: ``artifacts/classifier``, ``artifacts/optimized/*``, ``data/labeled/test.parquet``,
``reports/optimize.json``. Writes: ``benchmarks/results/variants.{json,md}``.

    python benchmarks/variants.py [--rounds 3] [--texts 300] [--threads 2] [--skip-runtimes]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import ensure_output, machine, machine_line, write_results  # noqa: E402
from bertflow import training as tr  # noqa: E402
from bertflow.classification import read_split  # noqa: E402
from bertflow.io import read_json  # noqa: E402
from bertflow.params import OptimizeParams  # noqa: E402
from bertflow.paths import Paths  # noqa: E402
from bertflow.serving import open_model  # noqa: E402
from tasks.optimize import measure_speed  # noqa: E402

REFERENCE = "reference (transformers pipeline)"


class PipelineSide:
    """transformers' pipeline behind the ``score(texts, batch_size)`` the timing loop calls."""

    def __init__(self, folder: Path):
        from transformers import pipeline

        self.pipeline = pipeline("text-classification", model=str(folder), tokenizer=str(folder), device="cpu",
                                 top_k=None)

    def score(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = self.pipeline(texts, truncation=True, batch_size=batch_size)
        return np.array([[entry["score"] for entry in sorted(row, key=lambda e: e["label"])] for row in out])


def sides(paths: Paths, threads: int) -> dict:
    ensure_output("optimize", paths.optimized, paths.root)
    found = {REFERENCE: PipelineSide(paths.classifier), "fp32": open_model(paths.classifier, threads)}
    for folder in sorted(p for p in paths.optimized.iterdir() if p.is_dir()):
        found[folder.name] = open_model(folder, threads)
    return found


def markdown(result: dict) -> str:
    rows = result["sides"]
    reference = rows[REFERENCE]
    lines = [f"# Classifier variants as served ({machine_line(result['machine'])})", "",
             f"{result['texts']} SST-2 test sentences one at a time, and the whole test split in calls of 64; "
             f"{result['rounds']} rounds taking the sides in turn; {result['threads']} threads per runtime. "
             "Accuracy: reports/optimize.json (the same test split).", "",
             "| side | accuracy | p50 / p99 ms, batch 1 | texts/s, batch 1 | texts/s, batch 64 | "
             "× reference, batch 1 | × fp32, batch 1 |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row.get('accuracy', '')} | {row['latency_p50_ms_b1']} / "
                     f"{row['latency_p99_ms_b1']} | {row['throughput_b1']} | {row['throughput_b64']} | "
                     f"{row['throughput_b1'] / reference['throughput_b1']:.2f}× | "
                     f"{row['throughput_b1'] / rows['fp32']['throughput_b1']:.2f}× |")
    for name, fusion in result.get("onnx_fusion", {}).items():
        lines.append(f"\n{name}: ONNX Runtime fusions {'kept' if fusion['applied'] else 'not applied'} "
                     f"(optimize.onnx_fusion: {fusion['setting']}" + (
                         f"; probe {fusion['unfused_seconds']} s unfused, {fusion['fused_seconds']} s fused)"
                         if "fused_seconds" in fusion else ")"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=300, help="test sentences timed one at a time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-runtimes", action="store_true", help="leave out benchmarks/runtimes.py")
    args = parser.parse_args()
    threads = tr.set_threads(args.threads)
    paths = Paths(REPO)
    texts = read_split(paths, "test")[0]
    settings = OptimizeParams(latency_sentences=args.texts, rounds=args.rounds, num_threads=threads)
    found = sides(paths, threads)
    figures = measure_speed(found, texts, settings)
    fusion = {name: side.variant["fusion"] for name, side in found.items()
              if "fusion" in getattr(side, "variant", {})}  # optimize.onnx_fusion's choice per ONNX form
    quality = read_json(paths.report("optimize"))["variants"] if paths.report("optimize").is_file() else {}
    for name, row in figures.items():
        if name in quality:
            row.update(accuracy=quality[name]["accuracy"], macro_f1=quality[name]["macro_f1"])
    result = {"machine": machine(), "texts": min(args.texts, len(texts)), "rounds": args.rounds, "threads": threads,
              "test_rows": len(texts), "sides": figures, "onnx_fusion": fusion}
    write_results("variants", result, markdown(result))
    if not args.skip_runtimes:
        from benchmarks import runtimes

        runtimes.run(rounds=max(args.rounds, 5), threads=threads, megatron=True)


if __name__ == "__main__":
    main()
