"""What every benchmark shares: the machine it ran on, the project's outputs it needs (built through DVC when
missing), and writing ``benchmarks/results/<name>.{json,md}``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, "
            f"Python {m['python']}, {m['date']}")


def ensure_output(stage: str, output: Path, root: Path = REPO) -> None:
    """``output`` of the project at ``root``, made by ``dvc repro <stage>`` when it is missing: a fresh clone's
    ``make bench`` builds what it measures, and through DVC nothing is built twice (up-to-date stages are
    skipped, dvc.lock records what was built). dvc.yaml calls ``bertflow``: this interpreter's scripts go on
    PATH, so the runner need not be started from an activated virtual environment."""
    if output.exists():
        return
    print(f"== {output} is missing: dvc repro {stage}", flush=True)
    scripts = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    subprocess.run([sys.executable, "-m", "dvc", "repro", stage], cwd=root, check=True,
                   env={**os.environ, "PATH": scripts})


def matmul_peak(dtype, warmup_seconds: float = 1.0, repeats: int = 3) -> float:
    """Best GFLOP/s of square matrix products (n = 512, 1024, 2048) in ``dtype`` (a torch dtype): each size warmed
    up for ``warmup_seconds`` (oneDNN's kernels and the clock settle: a cold first measurement read half the
    bf16 peak of one taken minutes later), then the best of ``repeats`` timed runs."""
    import torch

    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        deadline = time.perf_counter() + warmup_seconds
        while time.perf_counter() < deadline:
            a @ b
        reps = max(3, int(2e10 / (2 * n ** 3)))
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - started) / 1e9)
    return best


def matmul_rate(shapes: list[tuple[int, int, int]], dtype, warmup_seconds: float = 1.0, repeats: int = 3) -> float:
    """Best GFLOP/s of the products ``(m, k) @ (k, n)`` of ``shapes``, run in turn as one workload (a model's own
    matrix shapes: what its matmuls can reach on this CPU, against ``matmul_peak``'s large squares)."""
    import torch

    pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    deadline = time.perf_counter() + warmup_seconds
    while time.perf_counter() < deadline:
        for a, b in pairs:
            a @ b
    reps = max(3, int(2e10 / flops))
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(reps):
            for a, b in pairs:
                a @ b
        best = max(best, flops * reps / (time.perf_counter() - started) / 1e9)
    return best


def linear_shapes(rows: int, features: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The matrix products of training linear layers ``in -> out`` over ``rows`` rows: the forward pass, the
    gradient of the input and the gradient of the weight."""
    return [shape for k, n in features for shape in ((rows, k, n), (rows, n, k), (n, rows, k))]


def bert_linears(config) -> list[tuple[int, int]]:
    """Every linear layer of a BERT encoder, ``(in, out)``: query, key, value, attention output, intermediate,
    output, per layer."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return [(hidden, hidden)] * 4 * config.num_hidden_layers + [(hidden, inner), (inner, hidden)] * \
        config.num_hidden_layers


def throughput_figures(side, flops_per_token: float, peaks: dict, digits: int = 2) -> dict:
    """tokens/s, sequences/s, padding and MFU against the measured bf16/fp32 matmul peaks of a measured side (one
    with tokens, sequences, padded and seconds), given the model FLOPs per token of its work."""
    gflops = flops_per_token * side.tokens / side.seconds / 1e9
    return {"tokens_per_second": round(side.tokens / side.seconds),
            "sequences_per_second": round(side.sequences / side.seconds, digits),
            "padding_fraction": round(1 - side.tokens / side.padded, 3),
            "model_gflops_per_second": round(gflops, 1),
            "mfu_vs_bf16_peak": round(gflops / peaks["bf16"], 3),
            "mfu_vs_fp32_peak": round(gflops / peaks["fp32"], 3)}


def thousands(value) -> str:
    """``12,345`` for a number, ``–`` for a side that did not run."""
    return f"{value:,}" if isinstance(value, int | float) else "–"


def write_results(name: str, result: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown, flush=True)
