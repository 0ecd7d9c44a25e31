"""Recipe sweep: which pretraining/fine-tuning settings help SST-2 at the CPU profile's token budget.

A research tool, not a stage. It replays the default profile's recipe (the same pretrain_data
stage, the same loss, batches, schedule and fine-tuning loop pieces as ``tasks/``) on whatever
device is there (a GPU turns a 30-minute CPU trial into a minute), with the pretraining length
given in *tokens*: the number of tokens the CPU profile reaches in its wall-clock budget, so a
setting is judged at the budget it would get on 2 CPU cores.

Reads: ``data/corpus``, ``data/labeled``, ``artifacts/tokenizer`` (built by ``make run`` or
``dvc repro tokenizer``), ``params.yaml`` and a JSON list of trials (see ``benchmarks/sweep.json``).
Writes: ``<out>/sweep.json`` (one record per trial, written as trials finish) under the work folder.

Model selection: SST-2's dev split is carved from the training *phrases* (most dev rows are
substrings of training rows), so besides dev it reports ``dev_clean`` (the dev rows that are not a
substring of any training row) and chooses epochs by it; test figures are recorded for the record.

    python benchmarks/recipe_sweep.py --trials benchmarks/sweep.json --work /tmp/sweep --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def section(params: dict, trial: dict, name: str) -> dict:
    return merged(params[name], trial.get(name, {}))


def data_key(data_section: dict) -> str:
    return hashlib.sha1(json.dumps(data_section, sort_keys=True).encode()).hexdigest()[:10]


def link_inputs(root: Path, source: Path) -> None:
    for rel in ("data/corpus", "data/labeled", "artifacts/tokenizer"):
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to((source / rel).resolve())


# ---------------------------------------------------------------- one trial (child process)


def build_data(data_section: dict, root: Path, source: Path) -> None:
    from bertflow.params import PretrainDataParams
    from bertflow.paths import Paths
    from tasks import pretrain_data

    link_inputs(root, source)
    if not (root / "data/pretrain/info.json").is_file():
        pretrain_data.run(PretrainDataParams(**data_section), Paths(root))


def pretrain_tokens(trial: dict, params: dict, root: Path, device, token_budget: int) -> tuple[Path, dict]:
    import torch

    from bertflow import training as tr
    from bertflow.model import construct_config, construct_pretraining_model, pretraining_loss
    from bertflow.params import PretrainParams
    from bertflow.paths import Paths
    from bertflow.tokenization import load_tokenizer
    from tasks import pretrain as pt

    p = PretrainParams(**section(params, trial, "pretrain"))
    paths = Paths(root)
    tokenizer = load_tokenizer(paths.tokenizer)
    train_b, held_b, _ = pt.load_data(paths, tokenizer, p)
    config = construct_config(p.model, len(tokenizer), tokenizer.pad_token_id)
    model = construct_pretraining_model(config, p.seed).to(device)
    optimizer = torch.optim.AdamW(tr.parameter_groups(model, p.weight_decay), lr=p.learning_rate,
                                  betas=tuple(p.adam_betas), eps=p.adam_epsilon)
    state, cache, started, curve = pt.LoopState(), {}, time.time(), []
    model.train()
    while state.tokens < token_budget:
        tr.set_lr(optimizer, p.learning_rate, tr.lr_factor(state.tokens / token_budget, p.warmup_fraction))
        for micro in range(p.gradient_accumulation_steps):
            indices = pt.next_indices(state, train_b, p.batch_size, cache)
            batch = train_b.batch(indices, f"{p.seed}/{state.step}/{micro}")
            state.tokens += int(batch["attention_mask"].sum())
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = pretraining_loss(model, tr.to_device(batch, device))
            (out.loss / p.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if state.step % 100 == 0:
            curve.append((state.step, state.tokens, round(float(out.mlm_loss), 3)))
    held = heldout(model, held_b)
    folder = root / "pretrained"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder, {"steps": state.step, "tokens": state.tokens, "seconds": round(time.time() - started, 1),
                    "heldout": held, "curve": curve[-5:]}


def heldout(model, batches) -> dict:
    """The stage's held-out MLM/NSP figures (on the model's device), on the first 2,000 instances."""
    from bertflow.pretraining import evaluate_pretraining

    figures = evaluate_pretraining(model, batches, 2000, 128, bf16=False)
    return {key: round(figures[key], 4) for key in ("mlm_loss", "mlm_accuracy", "nsp_accuracy")}


def finetune(trial: dict, params: dict, root: Path, init: Path, device, random_init: bool) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from bertflow import training as tr
    from bertflow.classification import encode, read_split
    from bertflow.io import read_json
    from bertflow.metrics import classification_metrics
    from bertflow.model import load_classifier
    from bertflow.params import FinetuneParams
    from bertflow.paths import Paths
    from bertflow.tokenization import load_tokenizer
    from bertflow.training import epoch_order

    f = FinetuneParams(**section(params, trial, "finetune"))
    paths = Paths(root)
    tokenizer = load_tokenizer(init)
    labels = read_json(paths.labeled / "labels.json")["labels"]
    torch.manual_seed(f.seed)
    model = load_classifier(init, labels, f.classifier_dropout, random_init=random_init,
                            encoder_dropout=f.encoder_dropout).to(device)
    train_texts, train_labels = read_split(paths, "train")
    joined = "\n".join(t.strip() for t in train_texts)
    smoke = int(os.environ.get("SWEEP_SMOKE_ROWS", "0"))  # a quick check of the script itself
    if smoke:
        train_texts, train_labels = train_texts[:smoke], train_labels[:smoke]
    train = encode(tokenizer, train_texts, train_labels, f.max_seq_length)
    splits = {name: encode(tokenizer, *read_split(paths, name), f.max_seq_length) for name in ("dev", "test")}
    clean = [i for i, t in enumerate(read_split(paths, "dev")[0]) if t.strip() not in joined]
    optimizer = torch.optim.AdamW(tr.parameter_groups(model, f.weight_decay), lr=f.learning_rate)
    steps_total = len(train.labels) // f.batch_size * f.epochs
    step, history = 0, []
    for epoch in range(f.epochs):
        model.train()
        order = epoch_order([len(x) for x in train.input_ids], f.batch_size, f.seed, epoch)
        for start in range(0, len(order) - f.batch_size + 1, f.batch_size):
            tr.set_lr(optimizer, f.learning_rate, tr.lr_factor(step / steps_total, f.warmup_fraction))
            batch = tr.to_device(train.batch(order[start:start + f.batch_size], tokenizer.pad_token_id), device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).logits
            loss = F.cross_entropy(logits.float(), batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), f.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        row = {"epoch": epoch + 1}
        for name, data in splits.items():
            predicted = predict(model, data, tokenizer.pad_token_id, device)
            gold = np.array(data.labels)
            row[name] = round(classification_metrics(gold, predicted, len(labels))["accuracy"], 4)
            if name == "dev":
                row["dev_clean"] = round(float(np.mean(predicted[clean] == gold[clean])), 4)
        history.append(row)
    best = max(history, key=lambda r: (r["dev_clean"], r["epoch"]))
    best_dev = max(history, key=lambda r: (r["dev"], r["epoch"]))
    return {"history": history, "test_at_best_dev_clean": best["test"], "test_at_best_dev": best_dev["test"],
            "dev_clean_rows": len(clean)}


def predict(model, data, pad_id, device):
    """Predicted label ids in row order (the stage's own ``predict_logits``, on the model's device)."""
    from bertflow.classification import predict_logits

    return predict_logits(model, data, pad_id, 256).argmax(-1)


def run_trial(trial: dict, params: dict, work: Path, source: Path) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "1")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_section = section(params, trial, "pretrain_data")
    record = {"name": trial["name"], "device": str(device)}
    started = time.time()
    init = None
    if trial.get("pretrain_tokens"):
        data_root = work / f"data-{data_key(data_section)}"
        root = work / trial["name"]
        link_inputs(root, source)
        if not (root / "data/pretrain").exists():
            (root / "data/pretrain").symlink_to(data_root / "data/pretrain")
        init, record["pretrain"] = pretrain_tokens(trial, params, root, device, int(trial["pretrain_tokens"]))
    else:
        root = work / trial["name"]
        link_inputs(root, source)
        init = Path(trial["init_from"]) if "init_from" in trial else work / trial["init_trial"] / "pretrained"
    record["finetune"] = {}
    for seed in trial.get("finetune_seeds", [42]):
        seeded = merged(trial, {"finetune": {"seed": seed}})
        record["finetune"][str(seed)] = finetune(seeded, params, root, init, device, trial.get("random_init", False))
    record["seconds"] = round(time.time() - started, 1)
    return record


# ---------------------------------------------------------------- the sweep (parent process)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", default=str(REPO / "benchmarks/sweep.json"))
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--source", default=str(REPO), help="folder holding data/ and artifacts/tokenizer")
    parser.add_argument("--work", default="/tmp/sweep")
    parser.add_argument("--out", default="/tmp/sweep")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import yaml
    params = yaml.safe_load(Path(args.params).read_text())
    work, source = Path(args.work), Path(args.source)
    if args.data:
        section_ = json.loads(args.data)
        build_data(section_, work / f"data-{data_key(section_)}", source)
        return
    if args.one:
        print(json.dumps(run_trial(json.loads(args.one), params, work, source)))
        return
    trials = json.loads(Path(args.trials).read_text())
    sweep(trials, params, args, work)


def child(argv: list[str], log) -> str:
    result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    log.write(result.stderr[-3000:] + "\n")
    log.flush()
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return result.stdout


def sweep(trials: list[dict], params: dict, args, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--params", args.params, "--source", args.source, "--work", str(work)]
    log = open(out / "sweep.log", "a")
    data_sections = [section(params, t, "pretrain_data") for t in trials if t.get("pretrain_tokens")]
    sections = {data_key(s): s for s in data_sections}
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda s: child([*common, "--data", json.dumps(s)], log), sections.values()))
    print(f"data built: {len(sections)} variants", flush=True)
    results = []
    pretrained = [t for t in trials if t.get("pretrain_tokens")]
    dependent = [t for t in trials if t not in pretrained]

    def one(trial):
        try:
            record = json.loads(child([*common, "--one", json.dumps(trial)], log).strip().splitlines()[-1])
        except Exception as exc:  # a failed trial is reported, the sweep goes on
            record = {"name": trial["name"], "error": str(exc)[-500:]}
        results.append(record)
        (out / "sweep.json").write_text(json.dumps(results, indent=1))
        print(summary_line(record), flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, pretrained))
        list(pool.map(one, dependent))


def summary_line(record: dict) -> str:
    if "error" in record:
        return f"{record['name']}: ERROR {record['error'][-300:]}"
    parts = [record["name"]]
    if "pretrain" in record:
        held = record["pretrain"]["heldout"]
        parts.append(f"steps {record['pretrain']['steps']} mlm {held['mlm_loss']} acc {held['mlm_accuracy']} "
                     f"nsp {held['nsp_accuracy']}")
    for seed, ft in record["finetune"].items():
        parts.append(f"seed {seed}: test@devclean {ft['test_at_best_dev_clean']} test@dev {ft['test_at_best_dev']} "
                     + " ".join(f"e{h['epoch']}:{h['dev']}/{h['dev_clean']}/{h['test']}" for h in ft["history"]))
    parts.append(f"{record['seconds']}s")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
