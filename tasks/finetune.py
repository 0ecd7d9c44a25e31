"""Stage finetune: a BERT sequence classifier on the labeled data, within a budget, with early stopping on dev.

Reads: ``data/labeled/{train,dev}.parquet`` + ``labels.json``, and the starting model:
``artifacts/pretrained`` or any local transformers BERT checkpoint named by ``finetune.init``.
Writes: ``artifacts/classifier/`` (``save_pretrained`` + tokenizer, label maps in its config),
``artifacts/ablation/random_init/`` (the same recipe from random weights, when
``random_init_ablation``), resumable state under ``artifacts/finetune_checkpoints/``, the dev curves
``reports/finetune/<run>.csv`` (each epoch end, every ``eval_every_steps``, and where the budget ran
out) and ``reports/finetune.json`` (per run: why training stopped, the best evaluation, the curve).
Run: ``bertflow finetune``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bertflow import distributed as dd
from bertflow import training as tr
from bertflow.architectures import set_attention
from bertflow.cards import folder_card
from bertflow.classification import Encoded, class_weights, encode, predict_logits, read_split
from bertflow.io import InputError, atomic_dirs, read_json, write_json
from bertflow.metrics import classification_metrics
from bertflow.model import check_positions, check_vocab, load_classifier
from bertflow.params import PRETRAINED, FinetuneParams
from bertflow.paths import Paths
from bertflow.tokenization import load_tokenizer, save_model_folder

log = logging.getLogger(__name__)
EPOCH_FIELDS = ["step", "epoch", "train_loss", "dev_accuracy", "dev_macro_f1", "lr", "seconds"]


# ---------------------------------------------------------------- data and metrics (pure)


# ---------------------------------------------------------------- the loop


@dataclass
class FinetuneState:
    step: int = 0
    epoch: int = 0  # epochs finished
    cursor: int = 0  # next position in this epoch's order
    seconds: float = 0.0  # training time so far (dev evaluations and time dead after a crash not counted)
    best_metric: float = -1.0
    best_epoch: float = 0  # epochs done at the best evaluation (fractional inside an epoch)
    best_step: int = 0
    evaluations_without_gain: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    stopped_by: str | None = None  # "budget", "early_stopping" or "max_epochs" once the run has ended
    history: list = field(default_factory=list)


def train_classifier(model, train: Encoded, dev: Encoded, params: FinetuneParams, pad_id: int,
                     store: tr.CheckpointStore, curve: tr.MetricsLog, bf16: bool, saved: dict | None,
                     world: dd.World, label: str = "finetune") -> dict:
    """Epoch after epoch until the budget is spent, early stopping on dev ends the run or ``epochs`` is
    reached; the best dev evaluation's weights end up in ``model``.

    Under torchrun every process takes its slice of each global batch (``finetune.batch_size``);
    every process scores dev (the same weights give the same figures, so all stop together), rank 0's
    clock decides when a time budget is spent, and only rank 0 writes checkpoints and the curve. Progress
    (``label``) runs to the budget or the epoch cap, whichever comes first; early stopping may end it sooner.
    """
    optimizer = tr.adamw(model, params.learning_rate, params.weight_decay)
    steps_per_epoch = len(train.labels) // params.batch_size
    budget, schedule = tr.Budget(params.max_steps, params.budget_minutes), schedule_budget(params, steps_per_epoch)
    weights = class_weights(train.labels, model.config.num_labels).to(world.device) if params.class_weights else None
    state, best = FinetuneState(), copy.deepcopy(model.state_dict())
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        tr.restore_rng(saved["rng"])
        state, best = FinetuneState(**saved["loop"]), saved["best"]
    forward = dd.wrap(model, world)
    lengths = [len(ids) for ids in train.input_ids]
    progress = schedule.reporter(label, state.step, state.seconds, world.main)
    model.train()
    while state.stopped_by is None:
        epoch, order = state.epoch, tr.epoch_order(lengths, params.batch_size, params.seed, state.epoch)
        while state.stopped_by is None and state.epoch == epoch:
            started = time.perf_counter()
            lr = tr.set_lr(optimizer, params.learning_rate,
                           tr.lr_factor(schedule.progress(state.step, state.seconds), params.warmup_fraction))
            indices = dd.rank_share(order[state.cursor: state.cursor + params.batch_size], world)
            batch = tr.to_device(train.batch(indices, pad_id), world.device)
            loss = classification_step(forward, batch, weights, bf16, world)
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            advance(state, params.batch_size, len(order), loss)
            state.seconds += dd.broadcast_float(time.perf_counter() - started, world)
            spent = budget.spent(state.step, state.seconds)
            progress.update(state.step, state.seconds, loss=f"{loss:.4f}")
            if state.cursor == 0 or spent or (params.eval_every_steps and state.step % params.eval_every_steps == 0):
                best = _evaluate(model, dev, params, pad_id, state, best, curve, lr, bf16, steps_per_epoch)
                state.stopped_by = stop_reason(params, state, spent)
            if world.main and (state.cursor == 0 or state.stopped_by or store.due(
                    state.step, params.checkpoint_every_steps, params.checkpoint_every_minutes)):
                store.save(state.step, _checkpoint(model, optimizer, state, best))
    progress.close(f"stopped by {state.stopped_by}")
    model.load_state_dict(best)
    return {"stopped_by": state.stopped_by, "best_epoch": state.best_epoch, "best_step": state.best_step,
            f"best_dev_{params.metric}": round(state.best_metric, 5),
            "epochs_run": epochs_done(state, steps_per_epoch * params.batch_size), "steps": state.step,
            "seconds": round(state.seconds, 1), "history": state.history}


def schedule_budget(params: FinetuneParams, steps_per_epoch: int) -> tr.Budget:
    """What the learning-rate schedule is laid over: the budget or the epoch cap, whichever comes first."""
    cap = steps_per_epoch * params.epochs
    return tr.Budget(min(cap, params.max_steps or cap), params.budget_minutes)


def advance(state: FinetuneState, batch_size: int, epoch_rows: int, loss: float) -> None:
    """Count one step; after an epoch's last full batch, the next epoch starts at its beginning."""
    state.step, state.cursor = state.step + 1, state.cursor + batch_size
    state.loss_sum, state.loss_count = state.loss_sum + loss, state.loss_count + 1
    if state.cursor + batch_size > epoch_rows:  # the ragged tail is dropped: every batch is full
        state.epoch, state.cursor = state.epoch + 1, 0


def epochs_done(state: FinetuneState, epoch_rows: int) -> float:
    """Epochs trained: whole at an epoch's end (1, 2, ...), else to three decimals."""
    return state.epoch if state.cursor == 0 else round(state.epoch + state.cursor / epoch_rows, 3)


def stop_reason(params: FinetuneParams, state: FinetuneState, spent: bool) -> str | None:
    """Why the run ends after this dev evaluation, or None: it goes on."""
    if state.evaluations_without_gain >= params.early_stopping_patience:
        return "early_stopping"
    if spent:
        return "budget"
    return "max_epochs" if state.epoch >= params.epochs and state.cursor == 0 else None


def classification_step(forward, batch: dict, weights: torch.Tensor | None, bf16: bool, world: dd.World) -> float:
    """Forward and backward of this process's slice; returns the whole global batch's loss.

    Each process's mean loss is weighted by its share of the batch's total (class) weight, so DDP's
    gradient average equals the gradient of the global batch's loss on one process.
    """
    with tr.autocast(bf16, world.device):
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits
    loss = F.cross_entropy(logits.float(), batch["labels"], weight=weights)
    mass = float(weights[batch["labels"]].sum()) if weights is not None else float(len(batch["labels"]))
    total, loss_sum = dd.all_reduce([mass, loss.item() * mass], world, mean=False)  # one collective per step
    (loss * (mass * world.size / total)).backward()
    return loss_sum / total


def _evaluate(model, dev, params, pad_id, state: FinetuneState, best, curve, lr, bf16, steps_per_epoch):
    """Score dev, log the row; keep the weights when the dev metric is the best so far."""
    logits = predict_logits(model, dev, pad_id, params.batch_size * 4, bf16)
    metrics = classification_metrics(np.array(dev.labels), logits.argmax(-1), model.config.num_labels)
    epoch = epochs_done(state, steps_per_epoch * params.batch_size)
    row = {"step": state.step, "epoch": epoch,
           "train_loss": round(state.loss_sum / max(state.loss_count, 1), 5),
           "dev_accuracy": round(metrics["accuracy"], 5), "dev_macro_f1": round(metrics["macro_f1"], 5),
           "lr": f"{lr:.3e}", "seconds": round(state.seconds, 1)}
    curve.write(**row)
    state.history.append(row)
    log.info("dev at epoch %s: %s", epoch, row)
    if metrics[params.metric] > state.best_metric:
        state.best_metric, state.best_epoch, state.best_step = metrics[params.metric], epoch, state.step
        state.evaluations_without_gain = 0
        best = copy.deepcopy(model.state_dict())
    else:
        state.evaluations_without_gain += 1
    state.loss_sum, state.loss_count = 0.0, 0
    return best


def _checkpoint(model, optimizer, state: FinetuneState, best) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": copy.deepcopy(vars(state)),
            "rng": tr.rng_state(), "best": best}


# ---------------------------------------------------------------- edge


def init_folder(params: FinetuneParams, paths: Paths) -> Path:
    return paths.pretrained if params.init == PRETRAINED else Path(params.init)


def check_batches(train: Encoded, batch_size: int, source: Path) -> None:
    if len(train.labels) < batch_size:
        raise InputError(f"{source}: {len(train.labels)} rows, fewer than finetune.batch_size={batch_size}: "
                         "not one full batch to train on; lower finetune.batch_size or add rows")


def finetune_run(name: str, source: Path, random_init: bool, labels: list[str], params: FinetuneParams,
                 paths: Paths, tokenizer, world: dd.World) -> tuple[object, dict]:
    """Fine-tune one classifier (from ``source`` weights, or its architecture at random)."""
    tr.set_threads(params.num_threads)
    dd.check_split(params.batch_size, world, "finetune.batch_size")
    torch.manual_seed(params.seed)
    model = load_classifier(source, labels, params.classifier_dropout, random_init=random_init,
                            encoder_dropout=params.encoder_dropout).to(world.device)
    torch.manual_seed(params.seed + world.rank)  # the same weights everywhere, each process its own dropout
    set_attention(model, params.attention)  # a run-time choice: the saved config keeps the default
    check_vocab(model.config, len(tokenizer), str(source))
    check_positions(model.config, params.max_seq_length, "finetune.max_seq_length")
    train = encode(tokenizer, *read_split(paths, "train"), params.max_seq_length)
    check_batches(train, params.batch_size, paths.labeled / "train.parquet")
    dev = encode(tokenizer, *read_split(paths, "dev"), params.max_seq_length)
    fingerprint = {"init": str(source), "random_init": random_init, "labels": labels,
                   "params": params.model_dump(exclude={"checkpoint_every_steps", "checkpoint_every_minutes",
                                                         "keep_checkpoints", "num_threads", "random_init_ablation",
                                                         "seeds", "device"}),
                   "rows": {"train": len(train.labels), "dev": len(dev.labels)}}
    store = tr.CheckpointStore(paths.finetune_checkpoints / name, fingerprint, params.keep_checkpoints)
    latest = dd.open_checkpoints(store, world)
    saved = store.load(latest) if latest else None
    curve = tr.metrics_log(paths.reports / "finetune" / f"{name}.csv", EPOCH_FIELDS,
                           saved["loop"]["step"] if saved else None, world.main)
    summary = train_classifier(model, train, dev, params, tokenizer.pad_token_id, store, curve,
                               tr.use_bf16(params.bf16, world.device), saved, world, f"finetune {name}")
    return model, {**summary, "resumed_from_step": saved["loop"]["step"] if saved else 0, "store": store}


@dataclass(frozen=True)
class PlannedRun:
    name: str  # its curve, checkpoints and key in reports/finetune.json
    kind: str  # "pretrained" (from the starting model's weights) or "random_init" (its architecture at random)
    seed: int


def planned_runs(params: FinetuneParams) -> list[PlannedRun]:
    """The classifier and (with ``random_init_ablation``) its random-init twin for each of ``seeds`` seeds;
    the first seed's keep their plain names, the others are named by their seed (``pretrained_seed43``)."""
    return [PlannedRun(kind if k == 0 else f"{kind}_seed{params.seed + k}", kind, params.seed + k)
            for k in range(params.seeds) for kind in params.run_kinds]


def seeds_of(runs: list[PlannedRun]) -> list[int]:
    """The fine-tuning seeds of the planned runs, first seed first."""
    return [planned.seed for planned in runs if planned.kind == "pretrained"]


def save_models(paths: Paths, params: FinetuneParams, runs: list[PlannedRun], models: dict, figures: dict,
                labels: list[str], tokenizer) -> None:
    """The first seed's classifier (with its card) and random-init twin, every further seed's models under
    ``ablation/seeds/``, and ``ablation.json`` saying what is there; all or nothing."""
    with atomic_dirs([paths.classifier, paths.ablation]) as (classifier_dir, ablation_dir):
        for planned in runs:
            if planned.name == "pretrained":
                folder = classifier_dir
            elif planned.name == "random_init":
                folder = ablation_dir / "random_init"
            else:  # a further seed, where Paths.replica finds it, inside the staged ablation folder
                folder = ablation_dir / paths.replica(planned.kind, planned.seed).relative_to(paths.ablation)
            save_model_folder(models[planned.name], tokenizer, folder)
        (classifier_dir / "README.md").write_text(folder_card(
            labels, figures["pretrained"], params.model_dump(mode="json"),
            models["pretrained"].config.to_dict()), encoding="utf-8")
        write_json(ablation_dir / "ablation.json", {"random_init": params.random_init_ablation,
                                                    "seeds": seeds_of(runs)})


def run(params: FinetuneParams, paths: Paths) -> dict:
    """One process, or one rank of a torchrun world (rank 0 writes; every rank computes)."""
    world = dd.init_world(params.device, "finetune.device")
    source = init_folder(params, paths)
    tokenizer = load_tokenizer(source)
    labels = read_json(paths.labeled / "labels.json")["labels"]
    runs = planned_runs(params)
    models, figures = {}, {}
    for planned in runs:
        seeded = params.model_copy(update={"seed": planned.seed})
        models[planned.name], figures[planned.name] = finetune_run(
            planned.name, source, planned.kind == "random_init", labels, seeded, paths, tokenizer, world)
    stores = [summary.pop("store") for summary in figures.values()]
    if world.main:
        save_models(paths, params, runs, models, figures, labels, tokenizer)
        for store in stores:
            store.mark_complete()
    dd.leave_world(world)
    return {"init": str(params.init), "labels": labels, "processes": world.size, "device": str(world.device),
            "seeds": seeds_of(runs), **figures}

