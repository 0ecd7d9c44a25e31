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


def write_results(name: str, result: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown, flush=True)
