"""Stage pretrain: BERT pretraining with ``pretrain.objective``: masked LM + next-sentence prediction (mlm_nsp),
masked LM alone (mlm), or ELECTRA's replaced-token detection against a small generator (electra).

Reads: ``data/pretrain/{train,heldout}/*.arrow`` + ``info.json``, ``artifacts/tokenizer``, and the
``pretrain.init`` checkpoint when pretraining continues from one (a folder, or hf: through the hub cache).
Writes: ``artifacts/pretrained/`` (``save_pretrained`` layout, safetensors, plus the tokenizer and
``pretraining.json`` naming the objective; with electra the discriminator as a bare encoder and ``electra/``
holding the generator and the heads, ``bertflow/electra.py``),
``artifacts/pretrain_checkpoints/`` (resumable state; persistent across runs), the curves
``reports/pretrain/{train,eval}.csv`` and ``reports/pretrain.json``.
Run: ``bertflow pretrain``; after a crash the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bertflow import checkpoints as ck
from bertflow import distributed as dd
from bertflow import training as tr
from bertflow.io import InputError, atomic_dirs, read_json
from bertflow.masking import masking_spec
from bertflow.model import (
    PretrainingOutput,
    check_positions,
    check_vocab,
    compiled_masked_lm_loss,
    construct_config,
    construct_pretraining_model,
    masked_lm_loss,
)
from bertflow.params import PretrainDataParams, PretrainParams, objective_data_error
from bertflow.paths import Paths
from bertflow.pretraining import Objective, PretrainBatches, evaluate_pretraining, read_shards, write_objective
from bertflow.tokenization import load_tokenizer, save_model_folder

log = logging.getLogger(__name__)
# Every objective writes every column (empty where it has no such figure), so dvc.yaml's plots hold for all.
TRAIN_FIELDS = ["step", "loss", "mlm_loss", "nsp_loss", "rtd_loss", "lr", "tokens_per_second", "seconds"]
EVAL_FIELDS = ["step", "mlm_loss", "mlm_accuracy", "nsp_accuracy", "rtd_loss", "rtd_accuracy", "rtd_auc", "seconds"]


# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- evaluation


# ---------------------------------------------------------------- the loop


@dataclass
class StepSettings:
    """How a training step computes: bf16 autocast or not, the masked-LM loss function, the process world
    (which holds this process's device), the objective."""

    bf16: bool
    mlm_loss: Callable = masked_lm_loss
    world: dd.World = field(default_factory=dd.World)
    objective: Objective = field(default_factory=Objective)

    @classmethod
    def from_params(cls, params: PretrainParams, world: dd.World) -> StepSettings:
        loss = compiled_masked_lm_loss() if params.compile_loss else masked_lm_loss
        return cls(tr.use_bf16(params.bf16, world.device), loss, world, objective_of(params))


def objective_of(params: PretrainParams) -> Objective:
    return Objective(params.objective, params.electra.rtd_weight)


class PretrainingStep(torch.nn.Module):
    """The model and its loss as one module, so DistributedDataParallel sees (and syncs) the whole step."""

    def __init__(self, model, mlm_loss: Callable, objective: Objective):
        super().__init__()
        self.model, self.mlm_loss, self.objective = model, mlm_loss, objective

    def forward(self, batch: dict[str, torch.Tensor], noise_seed: str) -> PretrainingOutput:
        return self.objective.loss(self.model, batch, self.mlm_loss, noise_seed)


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    cursor: int = 0  # next position in this epoch's order (of global batches)
    seconds: float = 0.0  # training time so far (not counting time spent dead after a crash)
    tokens: int = 0  # non-padding tokens, all processes together
    short_steps: int = 0  # steps of the short phase (pretrain.short_seq_fraction)
    heldout_at_start: dict = field(default_factory=dict)  # the held-out figures before the first step


def next_indices(state: LoopState, batches: PretrainBatches, size: int, order_cache: dict) -> list[int]:
    """The next global batch of the epoch order (the same on every process)."""
    if state.epoch not in order_cache:
        order_cache.clear()
        order_cache[state.epoch] = batches.order(state.epoch, size)
    order = order_cache[state.epoch]
    if state.cursor + size > len(order):  # drop the ragged tail: every batch has the same size
        state.epoch, state.cursor = state.epoch + 1, 0
        return next_indices(state, batches, size, order_cache)
    indices = order[state.cursor: state.cursor + size]
    state.cursor += size
    return indices


def train(model, optimizer, train_batches: PretrainBatches, eval_batches: PretrainBatches, params: PretrainParams,
          store: tr.CheckpointStore, state: LoopState, logs: tuple[tr.MetricsLog, tr.MetricsLog],
          settings: StepSettings) -> dict:
    """Run optimizer steps until the budget is spent; returns the last held-out evaluation.

    Every process runs this loop; rank 0's clock decides when the time budget is spent, and only
    rank 0 writes checkpoints and logs (``logs`` are null logs elsewhere).
    """
    world = settings.world
    budget = tr.Budget(params.max_steps, params.budget_minutes)
    train_log, eval_log = logs
    stepper = dd.wrap(PretrainingStep(model, settings.mlm_loss, settings.objective), settings.world)
    order_cache: dict = {}
    last_eval: dict = {}
    if state.step == 0:  # what the starting weights score: what pretraining buys is measured from here
        state.heldout_at_start = _evaluate_and_log(model, eval_batches, params, state, eval_log, settings)
    progress = budget.reporter("pretrain", state.step, state.seconds, world.main)
    model.train()
    while budget.progress(state.step, state.seconds) < 1.0:
        started = time.perf_counter()
        lr = tr.set_lr(optimizer, params.learning_rate,
                       tr.lr_factor(budget.progress(state.step, state.seconds), params.warmup_fraction))
        short = budget.progress(state.step, state.seconds) < params.short_seq_fraction
        losses, tokens = accumulate(stepper, train_batches, params, state, order_cache, settings,
                                    params.short_seq_length if short else None)
        state.short_steps += short
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        elapsed = dd.broadcast_float(time.perf_counter() - started, world)
        state.seconds += elapsed
        state.tokens += tokens
        progress.update(state.step, state.seconds, loss=f"{losses[0]:.4f}", tokens_per_s=f"{tokens / elapsed:.0f}")
        if state.step % params.log_every == 0 or state.step == 1:
            parts = loss_columns(losses, settings.objective)
            train_log.write(step=state.step, **parts, lr=f"{lr:.3e}", tokens_per_second=round(tokens / elapsed),
                            seconds=round(state.seconds, 1))
            if world.main:
                log.info("step %d %s lr %.2e %.0f tokens/s", state.step,
                         " ".join(f"{k} {v:.4f}" for k, v in parts.items() if v != ""), lr, tokens / elapsed)
        if state.step % params.eval_every == 0:
            last_eval = _evaluate_and_log(model, eval_batches, params, state, eval_log, settings)
        if world.main and store.due(state.step, params.checkpoint_every_steps, params.checkpoint_every_minutes):
            store.save(state.step, checkpoint_state(model, optimizer, state))
    progress.close()
    if not last_eval or last_eval.get("step") != state.step:
        last_eval = _evaluate_and_log(model, eval_batches, params, state, eval_log, settings)
    return last_eval


def loss_columns(losses: tuple[float, float, float, float], objective: Objective) -> dict:
    """The train.csv loss columns of one step; empty where the objective has no such loss."""
    total, mlm, nsp, rtd = losses
    return {"loss": round(total, 5), "mlm_loss": round(mlm, 5), "nsp_loss": round(nsp, 5) if objective.nsp else "",
            "rtd_loss": round(rtd, 5) if objective.electra else ""}


def step_loss(out: PretrainingOutput, objective: Objective, world: dd.World) -> torch.Tensor:
    """The loss this process back-propagates: each token-averaged loss weighted by this process's share of the
    global micro-batch's tokens it averages over (masked tokens for the MLM, non-padding ones for RTD)."""
    masked, positions = dd.all_reduce([out.mlm_count, out.rtd_count], world, mean=False)
    loss = out.mlm_loss * (out.mlm_count * world.size / max(masked, 1))
    if objective.nsp:
        loss = loss + out.nsp_loss
    if objective.electra:
        loss = loss + objective.rtd_weight * out.rtd_loss * (out.rtd_count * world.size / max(positions, 1))
    return loss


def accumulate(stepper, batches, params, state, order_cache, settings: StepSettings, max_length: int | None = None
               ) -> tuple[tuple[float, float, float, float], int]:
    """Forward/backward over ``gradient_accumulation_steps`` global micro-batches, each split over the
    processes; returns the step's mean losses (total, mlm, nsp, rtd) and its non-padding tokens, all processes
    together.

    Each token-averaged loss of a process is weighted by its share of the micro-batch's tokens (``step_loss``),
    so DDP's gradient average is the gradient of the whole micro-batch's mean loss: the same as one
    process with the same global batch. Gradients are synchronised only on the last micro-batch.
    ``max_length``: instances cut to that length (the short phase of the sequence-length schedule).
    """
    world, steps, objective = settings.world, params.gradient_accumulation_steps, settings.objective
    # mlm loss × masked tokens, masked tokens, nsp loss, non-padding tokens, rtd loss × positions, positions
    sums = [0.0] * 6
    for micro in range(steps):
        indices = dd.rank_share(next_indices(state, batches, params.batch_size, order_cache), world)
        seed = f"{params.seed}/{state.step}/{micro}"
        batch = tr.to_device(batches.batch(indices, mask_seed=seed, max_length=max_length), world.device)
        sync = micro == steps - 1 or not world.distributed
        with nullcontext() if sync else stepper.no_sync():
            with tr.autocast(settings.bf16, world.device):
                out = stepper(batch, f"{seed}/{world.rank}")
            (step_loss(out, objective, world) / steps).backward()
        rtd = out.rtd_loss.item() * out.rtd_count if out.rtd_loss is not None else 0.0
        sums = [a + b for a, b in zip(sums, (out.mlm_loss.item() * out.mlm_count, out.mlm_count,
                                             out.nsp_loss.item() / steps, int(batch["attention_mask"].sum()),
                                             rtd, out.rtd_count), strict=True)]
    mlm_sum, masked, nsp_sum, tokens, rtd_sum, positions = dd.all_reduce(sums, world, mean=False)
    mlm, nsp, rtd = mlm_sum / max(masked, 1), nsp_sum / world.size, rtd_sum / max(positions, 1)
    total = mlm + nsp if not objective.electra else mlm + objective.rtd_weight * rtd
    return (total, mlm, nsp, rtd), int(tokens)


def _evaluate_and_log(model, eval_batches, params, state, eval_log, settings: StepSettings) -> dict:
    figures = evaluate_pretraining(model, eval_batches, params.eval_instances, params.batch_size, settings.bf16,
                                   settings.objective)
    columns = [name for name in EVAL_FIELDS if name not in ("step", "seconds")]
    eval_log.write(step=state.step, seconds=round(state.seconds, 1),
                   **{k: "" if figures.get(k) is None else figures[k] for k in columns})
    if settings.world.main:
        log.info("eval at step %d: %s", state.step, figures)
    return {"step": state.step, **figures}


def checkpoint_state(model, optimizer, state: LoopState) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": vars(state).copy(),
            "rng": tr.rng_state()}


# ---------------------------------------------------------------- edge


def load_data(paths: Paths, tokenizer, params: PretrainParams) -> tuple[PretrainBatches, PretrainBatches, dict]:
    info_path = paths.pretrain_data / "info.json"
    if not info_path.is_file():
        raise InputError(f"{info_path}: missing; run `bertflow pretrain_data` first")
    info = read_json(info_path)
    if info["vocab_size"] != len(tokenizer):
        raise InputError(f"{paths.pretrain_data}: built with a tokenizer of {info['vocab_size']} tokens, but "
                         f"{paths.tokenizer} has {len(tokenizer)}; re-run `bertflow pretrain_data`")
    data_params = PretrainDataParams(**info["params"])
    mismatch = objective_data_error(params.objective, data_params.next_sentence)
    if mismatch:
        raise InputError(f"{paths.pretrain_data}: {mismatch} (the shards were built with next_sentence false; "
                         "re-run `bertflow pretrain_data`)")
    if params.short_seq_fraction and params.short_seq_length >= data_params.max_seq_length:
        raise InputError(f"pretrain.short_seq_length is {params.short_seq_length} but the instances are at most "
                         f"pretrain_data.max_seq_length {data_params.max_seq_length} long: the short phase would cut "
                         "nothing; make it shorter, or set pretrain.short_seq_fraction: 0")
    dynamic = masking_spec(tokenizer, data_params) if data_params.masking == "dynamic" else None
    train = PretrainBatches(read_shards(paths.pretrain_data / "train"), tokenizer.pad_token_id, dynamic, params.seed)
    heldout = PretrainBatches(read_shards(paths.pretrain_data / "heldout"), tokenizer.pad_token_id, None, params.seed)
    return train, heldout, info


def run(params: PretrainParams, paths: Paths) -> dict:
    """One process, or one rank of a torchrun world (rank 0 writes; every rank computes)."""
    world = dd.init_world(params.device, "pretrain.device")
    threads = tr.set_threads(params.num_threads)
    tokenizer = load_tokenizer(paths.tokenizer)
    train_batches, eval_batches, info = load_data(paths, tokenizer, params)
    dd.check_split(params.batch_size, world, "pretrain.batch_size")
    model, config, start = starting_model(params, tokenizer, info["params"]["max_seq_length"])
    model = model.to(world.device)
    optimizer = tr.adamw(model, params.learning_rate, params.weight_decay, betas=tuple(params.adam_betas),
                         eps=params.adam_epsilon)
    fingerprint = run_fingerprint(params, config, info, start)
    store = tr.CheckpointStore(paths.pretrain_checkpoints, fingerprint, params.keep_checkpoints)
    state, resumed_from = resume(dd.open_checkpoints(store, world), model, optimizer)
    logs = (tr.metrics_log(paths.reports / "pretrain" / "train.csv", TRAIN_FIELDS, resumed_from, world.main),
            tr.metrics_log(paths.reports / "pretrain" / "eval.csv", EVAL_FIELDS, resumed_from, world.main))
    settings = StepSettings.from_params(params, world)
    final_eval = train(model, optimizer, train_batches, eval_batches, params, store, state, logs, settings)
    trained = objective_details(model, params, info)
    if world.main:
        with atomic_dirs([paths.pretrained]) as (folder,):
            save_pretrained(model, tokenizer, folder, settings.objective)
            write_objective(folder, settings.objective, trained)
        store.mark_complete()
    dd.leave_world(world)
    return {"steps": state.step, "epochs": round(state.epoch + state.cursor / len(train_batches), 3),
            "tokens": state.tokens, "seconds": round(state.seconds, 1),
            "tokens_per_second": round(state.tokens / max(state.seconds, 1e-9)), "bf16": settings.bf16,
            "device": str(world.device), "threads": threads, "processes": world.size,
            "parameters": encoder_parameters(model), **trained, **schedule_details(params, state),
            "resumed_from_step": resumed_from or 0,
            "start": start, "heldout_at_start": state.heldout_at_start, "heldout": final_eval}


def schedule_details(params: PretrainParams, state: LoopState) -> dict:
    """The sequence-length schedule, when on: the short length and how many steps trained at it."""
    if not params.short_seq_fraction:
        return {}
    return {"short_seq": {"length": params.short_seq_length, "fraction": params.short_seq_fraction,
                          "steps": state.short_steps}}


def save_pretrained(model, tokenizer, folder: Path, objective: Objective) -> None:
    """The pretrained model in the layout later stages load: the ...ForPreTraining model, or with ELECTRA the
    discriminator as a bare encoder plus ``electra/`` (generator and heads, for evaluate)."""
    if objective.electra:
        from bertflow import electra

        electra.save(model, tokenizer, folder, save_model_folder)
    else:
        save_model_folder(model, tokenizer, folder)


def encoder_parameters(model) -> int:
    """The parameters of what is saved as the pretrained model (ELECTRA: the discriminator, without its head)."""
    saved = model.discriminator if hasattr(model, "discriminator") else model
    return sum(p.numel() for p in saved.parameters())


def objective_details(model, params: PretrainParams, info: dict) -> dict:
    """What reports/pretrain.json and the saved folder's pretraining.json say of the objective: its name, the
    inputs (pairs or single segments), the heads not trained, and ELECTRA's generator."""
    details = {"objective": params.objective,
               "inputs": "pairs" if info["params"].get("next_sentence", True) else "single segments"}
    if params.objective == "mlm":
        details["untrained_heads"] = ["nsp_head", "pooler"]
    if params.objective == "electra":
        small = model.generator.config
        trained = sum(p.numel() for name, p in model.named_parameters()  # its encoder, projection and head
                      if p.requires_grad and not name.startswith(("discriminator.", "rtd_head.")))
        details["generator"] = {"hidden_size": small.hidden_size, "intermediate_size": small.intermediate_size,
                                "num_attention_heads": small.num_attention_heads,
                                "num_hidden_layers": small.num_hidden_layers, "parameters": trained,
                                "saved_in": "artifacts/pretrained/electra"}
        details["rtd_weight"] = params.electra.rtd_weight
    return details


def starting_model(params: PretrainParams, tokenizer, max_seq_length: int):
    """(model, config, what the report says of the start): random weights from ``seed``, or the
    ``pretrain.init`` checkpoint with the heads it lacked initialised from ``seed``."""
    if ck.is_scratch(params.init):
        config = construct_config(params.model, len(tokenizer), tokenizer.pad_token_id, params.architecture)
        model, start = construct_model(config, params), {"init": ck.SCRATCH}
    elif params.objective == "electra":
        raise InputError(f"pretrain.objective electra starts from random weights only (pretrain.init is "
                         f"{params.init}); set pretrain.init: scratch, or pretrain.objective: mlm_nsp or mlm")
    else:
        checkpoint = ck.resolve(params.init)
        config = ck.starting_config(checkpoint, params.model, params.architecture)
        check_vocab(config, len(tokenizer), f"pretrain.init {params.init}")
        if ck.load_checkpoint_tokenizer(checkpoint).get_vocab() != tokenizer.get_vocab():
            raise InputError(f"artifacts/tokenizer is not the vocabulary of pretrain.init {params.init}; re-run "
                             "`bertflow tokenizer` (it adopts the checkpoint's)")
        model, heads = ck.load_pretraining_model(checkpoint, config, params.seed, params.attention)
        start = {**checkpoint.describe(), "new_heads": heads}
        freeze_unused_heads(model, params)
    check_positions(config, max_seq_length, "pretrain.model.max_position_embeddings")
    return model, config, start


def construct_model(config, params: PretrainParams):
    """Random weights from ``seed``: the ...ForPreTraining model, or ELECTRA's discriminator and generator."""
    if params.objective == "electra":
        from bertflow import electra

        return electra.construct(config, params.electra.generator_size, params.seed, params.attention,
                                 params.embedding_init_std)
    model = construct_pretraining_model(config, params.seed, params.attention, params.embedding_init_std)
    freeze_unused_heads(model, params)
    return model


def freeze_unused_heads(model, params: PretrainParams) -> None:
    """Without NSP (objective mlm) the NSP head and the pooler beneath it get no gradient: frozen, so the
    optimizer leaves them as initialised and DistributedDataParallel does not wait for their gradients."""
    if params.objective == "mlm":
        for module in (model.cls.seq_relationship, model.bert.pooler):
            module.requires_grad_(False)


def run_fingerprint(params: PretrainParams, config, info: dict, start: dict) -> dict:
    """What makes two runs the same run: model config, where it started, training params (not
    logging/checkpointing, nor the device: a checkpoint resumes on another), data."""
    ignore = {"eval_every", "eval_instances", "checkpoint_every_steps", "checkpoint_every_minutes",
              "keep_checkpoints", "log_every", "num_threads", "device"}
    if params.objective != "electra":
        ignore = ignore | {"electra"}  # its settings shape only an ELECTRA run
    return {"model": config.to_diff_dict(), "start": start,
            "training": params.model_dump(exclude=ignore | {"model"}), "data": info["figures"]["train"]}


def resume(latest: Path | None, model, optimizer) -> tuple[LoopState, int | None]:
    """Load the checkpoint ``latest`` (rank 0 opened the store and told every rank which one)."""
    if latest is None:
        return LoopState(), None
    saved = tr.CheckpointStore.load(latest)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    tr.restore_rng(saved["rng"])
    state = LoopState(**saved["loop"])
    log.info("resumed from %s (step %d)", latest, state.step)
    return state, state.step
