"""How the data stages scale: ingest → pretrain_data on 1×, 4× and 16× the default corpus.

Reads params.yaml (or --params) and its local text sources; writes scratch roots (default: a temp folder,
removed scale by scale unless --keep), ``benchmarks/results/data_scaling.json`` and ``.md`` (or --results).
Each k× corpus is k copies of the sources, copy c > 0 with ``copy c:`` before every line, so each copy's
documents are distinct (ingest drops exact duplicates) and its text costs what the original costs. The
tokenizer is trained once, on the first scale's corpus, and copied to the others. Each stage runs as its
own process, as ``dvc repro`` runs it: wall time, the largest process's peak RSS (its ``VmHWM``, pool
workers included) and the peaks of the whole process tree's summed RSS (an upper bound of what the machine
must hold) and PSS, sampled every 0.1 s. The figures: seconds and peak memory per source MB as a
least-squares line ``a + b·MB``, each step's marginal cost against ``b`` (linear when every step is within
30 %), and the tree's peak summed RSS at the largest scale against the smallest (bounded when within 25 %). Not a test:

    python benchmarks/data_scaling.py                        # 1×, 4×, 16×: about 15 minutes on 2 cores
    python benchmarks/data_scaling.py --base-mb 1 --scales 1,2 --results /tmp/scaling   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine, machine_line  # noqa: E402

PLAIN_TEXT = (".txt", ".md")
STAGES = ("ingest", "pretrain_data")


def source_texts(params_path: Path, base_mb: float | None) -> tuple[list[tuple[str, str]], dict]:
    """(file name, text) of the params' corpus sources, cut at a blank line after ``base_mb`` MB when given,
    and the first source's settings (document boundary)."""
    from bertflow.params import load_params
    from bertflow.sources import list_files

    sources = load_params(params_path).ingest.corpus.sources
    texts, budget = [], (base_mb or float("inf")) * 1e6
    for source in sources:
        if source.is_hf:
            raise SystemExit(f"{source.path}: only local text sources can be scaled; download it first")
        for path in list_files(Path(source.path)):
            if path.suffix not in PLAIN_TEXT:
                raise SystemExit(f"{path}: only uncompressed {'/'.join(PLAIN_TEXT)} files can be scaled")
            text = path.read_text(encoding="utf-8")
            if len(text.encode("utf-8")) > budget:
                cut = text.rfind("\n\n", 0, int(budget))
                text = text[:cut if cut > 0 else int(budget)]
            texts.append((path.name, text))
            budget -= len(text.encode("utf-8"))
            if budget <= 0:
                return texts, sources[0].model_dump(mode="json")
    return texts, sources[0].model_dump(mode="json")


def distinct_copy(text: str, copy: int) -> str:
    """Copy 0 is the text itself; copy c > 0 has ``copy c:`` before every non-blank line.

    >>> distinct_copy("One.\\n\\nTwo.\\n", 3)
    'copy 3: One.\\n\\ncopy 3: Two.\\n'
    """
    if copy == 0:
        return text
    return "".join(f"copy {copy}: {line}" if line.strip() else line for line in text.splitlines(keepends=True))


def write_corpus(folder: Path, texts: list[tuple[str, str]], scale: int) -> float:
    """``scale`` distinct copies of the texts under ``folder``; returns their size in MB."""
    folder.mkdir(parents=True)
    size = 0
    for copy in range(scale):
        for index, (name, text) in enumerate(texts):
            data = distinct_copy(text, copy).encode("utf-8")
            (folder / f"{copy:03d}-{index:02d}-{name}").write_bytes(data)
            size += len(data)
    return size / 1e6


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, largest peak RSS) in bytes of a process and its descendants, now.

    The summed RSS counts the pages the forked workers share with the stage once per process (an upper
    bound); PSS shares them out, but grows as the workers touch (copy) what they inherited, with time rather
    than data. The peak RSS is each process's ``VmHWM`` (its high-water mark since its ``exec``); ``wait4``'s
    ``ru_maxrss`` is not used, because Linux carries the parent's high-water mark into a child across
    ``fork``/``exec``, so a big parent would hide the stage's peak.
    """
    import psutil

    rss = pss = peak = 0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    for process in processes:
        try:
            memory = process.memory_full_info()
            status = Path(f"/proc/{process.pid}/status").read_text()
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
        rss, pss = rss + memory.rss, pss + memory.pss
        if "VmHWM:" in status:  # a zombie's status has none
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) * 1024)
    return rss, pss, peak


def measure_stage(stage: str, params: Path, root: Path, overrides: list[str], every: float = 0.1) -> dict:
    """Run one stage in a child process; wall seconds, peak RSS of its largest process, peaks of its tree's
    summed RSS and PSS (sampled every ``every`` seconds), and its report."""
    code = ("import sys; from tasks.cli import run_stage; "
            f"run_stage({stage!r}, {str(params)!r}, {str(root)!r}, dict(a.split('=', 1) for a in sys.argv[1:]))")
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *overrides], cwd=REPO)
    peaks = [0, 0, 0]
    while process.poll() is None:
        peaks = [max(a, b) for a, b in zip(peaks, tree_memory(process.pid), strict=True)]
        time.sleep(every)
    if process.returncode:
        raise SystemExit(f"stage {stage} failed with status {process.returncode}")
    report = json.loads((root / "reports" / f"{stage}.json").read_text())
    tree_rss, tree_pss, largest = (round(peak / 2**20, 1) for peak in peaks)
    return {"wall_seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": largest,
            "peak_tree_rss_mb": tree_rss, "peak_tree_pss_mb": tree_pss, "report": report}


def run_scale(scale: int, texts, first_source: dict, params: Path, scratch: Path, overrides: list[str]) -> dict:
    """Ingest and pretrain_data on ``scale`` copies; the tokenizer from ``scratch/tokenizer`` (trained if missing)."""
    from bertflow.params import load_params, write_params_copy

    root = scratch / f"x{scale}"
    mb = write_corpus(root / "corpus", texts, scale)
    corpus = {**load_params(params).ingest.corpus.model_dump(mode="json"), "max_documents": None,
              "sources": [{**first_source, "path": str(root / "corpus")}]}
    scaled = write_params_copy(params, root / "params.yaml", {"ingest": {"corpus": corpus}})
    row = {"scale": scale, "source_mb": round(mb, 2), "stages": {}}
    row["stages"]["ingest"] = measure_stage("ingest", scaled, root, [])
    tokenizer = scratch / "tokenizer"
    if not tokenizer.is_dir():
        row["stages"]["tokenizer"] = measure_stage("tokenizer", scaled, root, [])
        shutil.copytree(root / "artifacts" / "tokenizer", tokenizer)
    else:
        shutil.copytree(tokenizer, root / "artifacts" / "tokenizer")
    row["stages"]["pretrain_data"] = measure_stage("pretrain_data", scaled, root, overrides)
    return row


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs.

    >>> fit_line([1, 2, 3], [3, 5, 7])
    (1.0, 2.0)
    """
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if n > 1 and sxx else 0.0
    return my - slope * mx, slope


def scaling(rows: list[dict], stage: str) -> dict:
    """Per-MB slope of wall time and memory of one stage, its step-by-step marginal costs and the two checks."""
    xs = [r["source_mb"] for r in rows]
    seconds = [r["stages"][stage]["wall_seconds"] for r in rows]
    memory = [r["stages"][stage]["peak_tree_rss_mb"] for r in rows]
    intercept, slope = fit_line(xs, seconds)
    steps = [(seconds[i + 1] - seconds[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    return {
        "seconds_intercept": round(intercept, 2), "seconds_per_mb": round(slope, 4),
        "marginal_seconds_per_mb": [round(s, 4) for s in steps],
        "linear": all(abs(s / slope - 1) <= 0.3 for s in steps) if slope > 0 and len(steps) > 1 else None,
        "memory_mb_per_source_mb": round(fit_line(xs, memory)[1], 4),
        "memory_growth": round(memory[-1] / memory[0], 3) if memory[0] else None,
        "memory_bounded": memory[-1] <= 1.25 * memory[0],
    }


def projection(fit: dict, target_mb: float) -> dict:
    seconds = fit["seconds_intercept"] + fit["seconds_per_mb"] * target_mb
    return {"target_mb": target_mb, "hours_one_machine": round(seconds / 3600, 1)}


def markdown(result: dict) -> str:
    scales = ", ".join(f"{row['scale']}×" for row in result["rows"])
    lines = [f"# Data stages at {scales} the corpus "
             f"({machine_line(result['machine'])})", "",
             f"params: {result['params']}; pretrain_data overrides: {result['overrides'] or 'none'}", "",
             "| scale | source MB | stage | wall s | MB/s | peak RSS MB, largest process | peak RSS MB, all | "
             "peak PSS MB, all |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for name, stage in row["stages"].items():
            lines.append(f"| {row['scale']}× | {row['source_mb']} | {name} | {stage['wall_seconds']} | "
                         f"{row['source_mb'] / stage['wall_seconds']:.2f} | {stage['peak_rss_mb']} | "
                         f"{stage['peak_tree_rss_mb']} | {stage['peak_tree_pss_mb']} |")
    lines += ["", "| stage | s per source MB | marginal s/MB per step | linear (±30 %) | memory growth, smallest → "
              "largest | bounded (≤ 1.25×) | 100 GB on one such machine, h |", "|---|---|---|---|---|---|---|"]
    for name, fit in result["scaling"].items():
        lines.append(f"| {name} | {fit['seconds_per_mb']} (+ {fit['seconds_intercept']} s) | "
                     f"{', '.join(map(str, fit['marginal_seconds_per_mb']))} | {fit['linear']} | "
                     f"{fit['memory_growth']}× | {fit['memory_bounded']} | "
                     f"{result['projection'][name]['hours_one_machine']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--scales", default="1,4,16", help="corpus multiples, smallest first")
    parser.add_argument("--base-mb", type=float, default=None, help="cut the 1× corpus to this many MB (smoke runs)")
    parser.add_argument("--num-proc", type=int, default=None, help="pretrain_data.num_proc (default: the params')")
    parser.add_argument("--root", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep each scale's corpus and outputs")
    parser.add_argument("--results", default=str(RESULTS), help="folder for data_scaling.{json,md}")
    args = parser.parse_args()
    params = Path(args.params).resolve()
    scratch = Path(args.root or tempfile.mkdtemp(prefix="bench-scaling-"))
    scratch.mkdir(parents=True, exist_ok=True)
    overrides = [f"pretrain_data.num_proc={args.num_proc}"] if args.num_proc else []
    texts, first_source = source_texts(params, args.base_mb)
    rows = []
    for scale in sorted(int(s) for s in args.scales.split(",")):
        print(f"== {scale}×", flush=True)
        rows.append(run_scale(scale, texts, first_source, params, scratch, overrides))
        if not args.keep:
            shutil.rmtree(scratch / f"x{scale}")
    fits = {stage: scaling(rows, stage) for stage in STAGES}
    result = {"machine": machine(), "params": str(params.relative_to(REPO) if params.is_relative_to(REPO) else params),
              "overrides": overrides, "rows": rows, "scaling": fits,
              "projection": {stage: projection(fit, 100_000) for stage, fit in fits.items()}}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "data_scaling.md").write_text(markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
