"""Does from-scratch pretraining pay? Each recipe at the real budget on the real CPU, through the real stages.

A recipe is a set of params overrides (dotted keys, ``benchmarks/pretraining_sweep.json``) on the profile
(params.yaml by default): ``bertflow pretrain`` with its time budget, ``bertflow finetune`` with
``finetune.seeds`` seeds (optionally a cheaper probe budget), ``bertflow evaluate``, whose
``pretraining_gain`` is the answer: the classifier against the same fine-tuning from random weights over
every seed, with its interval and exact paired test, and against TF-IDF. The random-init twins depend only
on the architecture and the fine-tuning, so recipes that share those share them (fine-tuned once, then
grafted into ``artifacts/ablation``).

Each recipe's figures are written to ``benchmarks/results/pretraining_sweep/<recipe>.json`` as soon as it
ends, with a hash of its params: a recipe already recorded with the same params is not run again, so the
sweep (hours on 2 cores) goes on where it stopped, in another session or on another day, and the table
``benchmarks/results/pretraining_sweep.md`` is rebuilt from every recorded recipe.

Reads: the profile, ``data/corpus``, ``data/labeled``, ``artifacts/tokenizer`` and ``data/pretrain`` of
the project (built through DVC, ``dvc repro pretrain_data``, when missing). Writes: ``<work>/<recipe>/``
(a project per recipe: data linked, pretraining data rebuilt there when a recipe changes
``pretrain_data``), ``<work>/ablation/<key>/`` and the results above.

    python benchmarks/pretraining_sweep.py                         # every recipe, probe fine-tuning
    python benchmarks/pretraining_sweep.py --recipes base,preln_electra --full   # the default fine-tuning on the
        # probe runs' encoders (pretrained again where none is left), into benchmarks/results/pretraining_sweep_full
    python benchmarks/pretraining_sweep.py --profile params.tiny.yaml --project /tmp/tiny \\
        --results /tmp/sweep-results --seeds 2     # smoke run on a tiny project (ingest..pretrain_data there)
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, ensure_output, machine, machine_line  # noqa: E402
from bertflow.params import get_dotted, set_dotted  # noqa: E402
from bertflow.paths import Paths  # noqa: E402
from bertflow.statistics import paired_runs  # noqa: E402
from bertflow.timings import read_stage_report  # noqa: E402

RECIPES = REPO / "benchmarks" / "pretraining_sweep.json"
# The probe: 1,650 steps, 0.87 of an SST-2 epoch (82-91 s on a 2-core bf16 CPU, against the default's 5 minutes,
# ~3 epochs), counted in steps so that a busy machine slows it without changing it. --full runs the profile's own
# fine-tuning instead, to show the probe ranks recipes as the default does.
PROBE = {"finetune.budget_minutes": None, "finetune.max_steps": 1650}
INPUTS = ("data/corpus", "data/labeled", "artifacts/tokenizer")
# What the pretrain stage leaves (dvc.yaml's outs and metrics), linked into a --full run from its probe run.
PRETRAINED = ("artifacts/pretrained", "reports/pretrain", "reports/pretrain.json", "reports/timing/pretrain.json")
PRETRAINING_KEYS = ("ingest", "tokenizer", "pretrain_data", "pretrain")
PRETRAIN_DATA = "data/pretrain"
ABLATION_KEYS = ("pretrain.architecture", "pretrain.model", "finetune", "ingest", "tokenizer")
# What a recipe's figures depend on: the stages it runs and the data they read. Other sections (lm_baselines,
# optimize, register, ...) may change without re-running recorded recipes.
RECORD_KEYS = ("ingest", "tokenizer", "pretrain_data", "pretrain", "finetune", "evaluate")
# Settings added after recipes were recorded, at the value that does what the code did before: left out of the
# comparison while they hold it, so a new setting does not make every recorded recipe (and pretraining) stale.
NEUTRAL = {"pretrain.embedding_init_std": None}
# Held-out evaluations while pretraining, as every recipe was recorded with. They do not shape the model (the
# budget does not count them; run_fingerprint ignores them), so the sweep keeps them fixed whatever the
# profile's own monitoring is, and a change to it does not make the records stale.
MONITORING = {"pretrain.eval_every": 500, "pretrain.eval_instances": 2000}


# ---------------------------------------------------------------- recipes (pure)


def recipe_params(profile_file: Path, overrides: dict, fine_tuning: dict) -> dict:
    """The profile with the recipe's overrides and this sweep's fine-tuning, validated (a bad recipe fails
    before anything runs) and with every path absolute, so the recipe's params file works from its folder."""
    from bertflow.params import load_params

    # the majority baseline off: recipes are compared with TF-IDF only
    changes = {**MONITORING, **overrides, **fine_tuning, "evaluate.majority_baseline": False}
    return load_params(profile_file, changes).model_dump(mode="json")


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def comparable(params: dict) -> dict:
    """``params`` without the ``NEUTRAL`` settings that hold their neutral value."""
    params = copy.deepcopy(params)
    for key, value in NEUTRAL.items():
        section, _, name = key.rpartition(".")
        if get_dotted(params, section).get(name, value) == value:
            get_dotted(params, section).pop(name, None)
    return params


def record_hash(params: dict) -> str:
    params = comparable(params)
    return digest({key: params[key] for key in RECORD_KEYS})


def ablation_key(params: dict) -> str:
    """What the random-init twins depend on: the architecture and sizes, the fine-tuning, the data."""
    return digest({key: get_dotted(params, key) for key in ABLATION_KEYS})


def own_pretraining_data(params: dict, profile: dict) -> bool:
    return params["pretrain_data"] != profile["pretrain_data"]


def figures(root: Path, recipe: str, params_hash: str, seconds: dict) -> dict:
    """What the table needs from the recipe's reports, with each test row's right/wrong per seed (for the paired
    test against the base recipe)."""
    pretrain = read_stage_report(Paths(root), "pretrain")  # results and timings (tokens_per_second)
    evaluation = json.loads((root / "reports/evaluate.json").read_text())
    gain = evaluation["pretraining_gain"]
    return {"recipe": recipe, "params_hash": params_hash, "seconds": seconds,
            "pretrain": {key: pretrain.get(key) for key in ("steps", "tokens", "tokens_per_second", "heldout",
                                                            "heldout_at_start")},
            "test_accuracy": evaluation["test"]["accuracy"], "pretraining_gain": gain,
            "correct_by_seed": seed_correctness(root / "reports/evaluate/seeds.csv")}


def seed_correctness(path: Path) -> dict[str, list[str]]:
    """evaluate's ``seeds.csv`` as ``{kind: ["0110…" per seed]}``: compact, and enough for a paired test."""
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kinds: dict[str, list[str]] = {}
    for column in list(rows[0])[1:]:
        kinds.setdefault(column.split("_seed")[0], []).append("".join(row[column] for row in rows))
    return kinds


def against(record: dict, reference: dict | None) -> dict | None:
    """The recipe's classifiers against another recipe's (the base, or the profile's own), seed by seed on the
    same test rows: the gain with its interval and the exact paired sign-flip test
    (``bertflow.statistics.paired_runs``)."""
    if reference is None or record is reference or any("correct_by_seed" not in side for side in (record, reference)):
        return None
    flags = [[[int(c) for c in run] for run in side["correct_by_seed"]["pretrained"]] for side in (record, reference)]
    return paired_runs(*flags)


def versus_cell(record: dict, reference: dict | None) -> str:
    versus = against(record, reference)
    return "–" if versus is None else (
        f"{100 * versus['gain']:+.2f} [{100 * versus['gain_interval']['lower']:+.1f}, "
        f"{100 * versus['gain_interval']['upper']:+.1f}] ({versus['p_value']:.2g})")


def table(records: list[dict], base_name: str = "base", default_name: str | None = None) -> list[str]:
    """The sweep's table: each recipe against random init, TF-IDF and the base recipe, and, when one of the
    recorded recipes is the profile's own (``default_name``) and not the base, against that too."""
    names = [base_name] + ([default_name] if default_name and default_name != base_name else [])
    references = [next((record for record in records if record["recipe"] == name), None) for name in names]
    head = " | ".join(f"vs {name}, 95 % interval (p)" for name in names)
    rows = ["| recipe | tokens | held-out | test accuracy per seed | mean | random init (mean) | gain, 95 % "
            f"interval | paired p | vs TF-IDF (p) | {head} |",
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for record in records:
        versus = " | ".join(versus_cell(record, reference) for reference in references)
        gain, held = record["pretraining_gain"], record["pretrain"].get("heldout") or {}
        heldout = ", ".join(f"{key} {value}" for key, value in held.items() if key not in ("instances", "step"))
        tfidf = gain.get("tfidf_logreg", {})
        rows.append(
            f"| {record['recipe']} | {record['pretrain'].get('tokens', 0):,} | {heldout} | "
            f"{' / '.join(f'{100 * a:.1f}' for a in gain['classifier_accuracy_by_seed'])} | "
            f"{100 * gain['classifier_accuracy']:.2f} | {100 * gain['other_accuracy']:.2f} | "
            f"{100 * gain['gain']:+.2f} [{100 * gain['gain_interval']['lower']:+.1f}, "
            f"{100 * gain['gain_interval']['upper']:+.1f}] | {gain['p_value']:.2g} | "
            f"{100 * tfidf.get('gain', float('nan')):+.2f} ({tfidf.get('p_value', float('nan')):.2g}) | {versus} |")
    return rows


# ---------------------------------------------------------------- running (edge)


def bertflow(stage: str, params_file: Path, root: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(params_file), "--root", str(root), stage],
                   cwd=REPO, check=True)
    return round(time.perf_counter() - started, 1)


def prepare_project(project: Path, profile_file: Path) -> None:
    """The profile's inputs through DVC (nothing built twice) when the project lacks them."""
    if all((project / path).exists() for path in (*INPUTS, PRETRAIN_DATA)):
        return
    if project != REPO or profile_file.resolve() != (REPO / "params.yaml").resolve():
        raise SystemExit(f"{project}: no {PRETRAIN_DATA}; build the profile's data there first (`bertflow --params "
                         f"{profile_file} --root {project} ingest`, then tokenizer and pretrain_data)")
    ensure_output("pretrain_data", project / PRETRAIN_DATA)


def link(project: Path, root: Path, paths: tuple[str, ...]) -> None:
    for rel in paths:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to((project / rel).resolve())


def pretrained_by(folder: Path, params: dict) -> bool:
    """Whether ``folder`` holds a finished pretraining with ``params``'s pretraining settings."""
    done = folder / "params.yaml"
    if not (done.is_file() and all((folder / rel).exists() for rel in PRETRAINED)):
        return False
    earlier, params = comparable(yaml.safe_load(done.read_text())), comparable(params)
    return all(earlier.get(key) == params[key] for key in PRETRAINING_KEYS)


def run_recipe(name: str, params: dict, profile: dict, project: Path, work: Path,
               pretrained: Path | None = None) -> tuple[Path, dict]:
    """Pretrain, fine-tune (or graft the shared random-init twins) and evaluate one recipe in its own project;
    with ``pretrained`` (a folder whose pretraining had these settings), its encoder instead of pretraining."""
    root = work / (name if pretrained is None else f"{name}--full")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shared = work / "ablation" / ablation_key(params)
    twins = (shared / "ablation.json").is_file()
    set_dotted(params, "finetune.random_init_ablation", not twins)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = {}
    link(project, root, INPUTS if own_pretraining_data(params, profile) else (*INPUTS, PRETRAIN_DATA))
    if pretrained is not None:  # its encoder, and the held-out data evaluate scores it on
        link(pretrained, root, (*PRETRAINED, PRETRAIN_DATA) if own_pretraining_data(params, profile) else PRETRAINED)
        seconds["pretrained_from"] = str(pretrained)
    elif own_pretraining_data(params, profile):
        seconds["pretrain_data"] = bertflow("pretrain_data", params_file, root)
    for stage in ("finetune",) if pretrained is not None else ("pretrain", "finetune"):
        seconds[stage] = bertflow(stage, params_file, root)
        seconds[f"load_after_{stage}"] = [round(load, 2) for load in os.getloadavg()]  # 2.0: the sweep alone
    if twins:
        copy_twins(shared, Paths(root).ablation)
    else:
        copy_twins(Paths(root).ablation, shared)
    seconds["evaluate"] = bertflow("evaluate", params_file, root)
    return root, seconds


def copy_twins(source: Path, target: Path) -> None:
    """The random-init twins of every seed (not the pretrained replicas) and ablation.json, from one ablation
    folder to another: kept from the first recipe of their key, grafted into the later ones as if their own
    finetune had made them."""
    record = json.loads((source / "ablation.json").read_text())
    layout = Paths(Path("."))  # Paths.replica's layout, relative to an ablation folder
    folders = ["random_init"] + [layout.replica("random_init", seed).relative_to(layout.ablation)
                                 for seed in record["seeds"][1:]]
    for folder in folders:
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    (target / "ablation.json").write_text(json.dumps({**record, "random_init": True}))


def recorded(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def write_table(results: Path, profile: Path, fine_tuning: dict) -> None:
    records = recorded(results)
    own = record_hash(recipe_params(profile, {}, fine_tuning))  # the profile as it is: its default recipe
    default = next((record["recipe"] for record in records if record["params_hash"] == own), None)
    lines = [f"# Pretraining recipes on {profile.name}'s budget ({machine_line(machine())})", "",
             f"Fine-tuning: {json.dumps(fine_tuning)}; `python benchmarks/pretraining_sweep.py` re-runs what "
             "is missing. Paired p: the exact sign-flip test over the test rows across seeds (evaluate's "
             f"`pretraining_gain`). The profile's own recipe: {default or 'not recorded'}.", "",
             *table(records, default_name=default), ""]
    (results.parent / f"{results.name}.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", help="comma-separated names (default: all of --file)")
    parser.add_argument("--file", type=Path, default=RECIPES)
    parser.add_argument("--profile", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--project", type=Path, default=REPO, help="where the profile's data and tokenizer are")
    parser.add_argument("--full", action="store_true", help="the profile's own fine-tuning budget, not the probe")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bertflow-sweep"))
    parser.add_argument("--results", type=Path, default=None,
                        help="default: benchmarks/results/pretraining_sweep (with --full: pretraining_sweep_full)")
    args = parser.parse_args()
    args.results = args.results or RESULTS / ("pretraining_sweep_full" if args.full else "pretraining_sweep")
    recipes = json.loads(args.file.read_text())
    chosen = args.recipes.split(",") if args.recipes else list(recipes)
    unknown = [name for name in chosen if name not in recipes]
    if unknown:
        raise SystemExit(f"{args.file}: no recipe {', '.join(unknown)} (it has {', '.join(recipes)})")
    profile = recipe_params(args.profile, {}, {})
    fine_tuning = {"finetune.seeds": args.seeds, **({} if args.full else PROBE)}
    project = args.project.resolve()
    prepare_project(project, args.profile)
    args.results.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        params = recipe_params(args.profile, recipes[name], fine_tuning)
        params_hash = record_hash(params)
        done = args.results / f"{name}.json"
        record = json.loads(done.read_text()) if done.is_file() else {}
        if record.get("params_hash") == params_hash:
            root = args.work / name
            if "correct_by_seed" not in record and (root / "reports/evaluate.json").is_file():
                print(f"== {name}: recorded before evaluate kept each seed's rows; scored again", flush=True)
                seconds = {**record["seconds"], "evaluate": bertflow("evaluate", root / "params.yaml", root)}
                done.write_text(json.dumps(figures(root, name, params_hash, seconds), indent=2) + "\n")
            else:
                print(f"== {name}: recorded with these params, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        probe_run = args.work / name
        reuse = probe_run if args.full and pretrained_by(probe_run, params) else None
        root, seconds = run_recipe(name, params, profile, project, args.work, reuse)
        done.write_text(json.dumps(figures(root, name, params_hash, seconds), indent=2) + "\n")
        write_table(args.results, args.profile, fine_tuning)
    write_table(args.results, args.profile, fine_tuning)


if __name__ == "__main__":
    main()
