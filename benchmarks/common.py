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


def write_results(name: str, result: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown, flush=True)
