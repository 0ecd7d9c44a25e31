"""Making the classifier cheaper: int8 quantization, ONNX export, distillation into a student, pruning.

Each function takes the fine-tuned classifier (a transformers ``BertForSequenceClassification`` or
``MegatronBertForSequenceClassification``) and writes one variant folder that ``bertflow/serving.py``
can open: ``tokenizer.json`` and
``config.json`` always, the weights, and ``variant.json`` naming the runtime when it is not a
plain ``save_pretrained`` model. Reads nothing itself; the stage (tasks/optimize.py) hands in the
models and data. The training loops (distillation, pruning recovery) write a metrics CSV row
every ``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from bertflow import training as tr
from bertflow.architectures import set_attention
from bertflow.classification import Encoded
from bertflow.io import InputError, write_json
from bertflow.progress import Progress
from bertflow.serving import VARIANT_FILE, OnnxRuntime, quantize_int8, softmax

log = logging.getLogger(__name__)
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DISTILL_FIELDS = ["step", "epoch", "loss", "soft_loss", "hard_loss", "lr"]
PRUNE_FIELDS = ["step", "epoch", "loss", "lr"]


# ---------------------------------------------------------------- folders


def copy_tokenizer(source: Path, folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def save_variant(model: PreTrainedModel, source: Path, folder: Path) -> Path:
    """A plain ``save_pretrained`` variant (student, pruned): served like the champion."""
    model.save_pretrained(str(folder))
    copy_tokenizer(source, folder)
    return folder / "model.safetensors"


def describe(folder: Path, name: str, runtime: str, weights: str, **extra) -> Path:
    write_json(folder / VARIANT_FILE, {"name": name, "runtime": runtime, "weights": weights, **extra})
    return folder / weights


# ---------------------------------------------------------------- quantization (PyTorch)


def quantized_variant(model: PreTrainedModel, source: Path, folder: Path) -> Path:
    """int8 dynamic quantization of every linear layer; the int8 state dict is what is stored."""
    quantized = quantize_int8(copy.deepcopy(model).eval())
    model.config.save_pretrained(str(folder))
    copy_tokenizer(source, folder)
    torch.save(quantized.state_dict(), folder / "model_int8.pt")
    return describe(folder, "int8", "torch_int8", "model_int8.pt")


# ---------------------------------------------------------------- ONNX


class LogitsOnly(torch.nn.Module):
    """The classifier with positional inputs and one output, as the exporter wants it."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def onnx_variant(model: PreTrainedModel, source: Path, folder: Path, opset: int) -> Path:
    """Export with dynamic batch and sequence axes (the TorchScript exporter; eager attention), unfused; the
    stage then applies ``fuse_export`` and describes the variant again with the fusion's figures."""
    exported = copy.deepcopy(model).eval()
    set_attention(exported, "eager")
    example = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
    inputs = (example, (example > 0).long(), torch.zeros_like(example))
    axes = {name: {0: "batch", 1: "sequence"} for name in ONNX_INPUTS}
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(LogitsOnly(exported), inputs, str(folder / "model.onnx"), input_names=list(ONNX_INPUTS),
                          output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    model.config.save_pretrained(str(folder))
    copy_tokenizer(source, folder)
    return describe(folder, "onnx", "onnxruntime", "model.onnx")


@contextlib.contextmanager
def quiet_onnxruntime_tools():
    """ONNX Runtime's Python tools log every tensor they leave alone, and advice, at INFO/WARNING."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def fuse_onnx(source: Path, target: Path, config: PretrainedConfig) -> dict[str, int]:
    """ONNX Runtime's transformer fusions (``onnxruntime.transformers.optimizer``, model type bert) on an
    exported graph: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu where the graph's
    pattern matches (MegatronBert's pre-LayerNorm blocks match fewer). Python fusions only (``opt_level=0``):
    the graph stays portable, ONNX Runtime still applies its own optimizations when a session opens it.
    Returns {fused operator: count} (the ones that fired)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet_onnxruntime_tools():
        fused = optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=0)
        fused.save_model_to_file(str(target))
    return {name: count for name, count in fused.get_fused_operator_statistics().items() if count}


FUSED_ONNX = "model.fused.onnx"


def keep_fusion(setting: str, unfused_seconds: float, fused_seconds: float, difference: float,
                tolerance: float) -> bool:
    """``on``/``off`` as said; ``auto`` keeps the fused graph where it is faster and computes the same
    probabilities (within ``tolerance``). ``on`` still meets the stage's tolerance check against PyTorch."""
    if setting != "auto":
        return setting == "on"
    return difference <= tolerance and fused_seconds < unfused_seconds


def time_graphs(folder: Path, names: list[str], batches: list[tuple[np.ndarray, np.ndarray]], rounds: int,
                threads: int | None) -> tuple[dict[str, float], float]:
    """Seconds of ``rounds`` interleaved passes over ``batches`` (ids, mask) for each graph in ``folder``, as
    served (``OnnxRuntime``), and the largest |Δ probability| between the first two graphs."""
    sessions = {name: OnnxRuntime(folder, {"weights": name}, threads) for name in names}
    outputs = {name: [softmax(session.logits(*batch)) for batch in batches] for name, session in sessions.items()}
    difference = max(float(np.abs(a - b).max()) for a, b in zip(outputs[names[0]], outputs[names[1]], strict=True))
    seconds = dict.fromkeys(names, 0.0)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            started = time.perf_counter()
            for batch in batches:
                sessions[name].logits(*batch)
            seconds[name] += time.perf_counter() - started
    return seconds, difference


def fuse_export(folder: Path, config: PretrainedConfig, setting: str, batches: list, tolerance: float,
                rounds: int, threads: int | None) -> dict:
    """Apply ``optimize.onnx_fusion`` to ``folder/model.onnx``: the graph kept is left as ``model.onnx`` (so
    the int8 form quantizes it: fuse, then quantize) and the figures behind the choice are returned for
    ``variant.json``. ``auto`` times both graphs on ``batches`` (the test split's texts) in interleaved rounds."""
    if setting == "off":
        return {"setting": "off", "applied": False}
    graph = folder / "model.onnx"
    fired = fuse_onnx(graph, folder / FUSED_ONNX, config)
    seconds, difference = time_graphs(folder, ["model.onnx", FUSED_ONNX], batches, rounds, threads)
    applied = keep_fusion(setting, seconds["model.onnx"], seconds[FUSED_ONNX], difference, tolerance)
    if applied:
        (folder / FUSED_ONNX).replace(graph)
    else:
        (folder / FUSED_ONNX).unlink()
    return {"setting": setting, "applied": applied, "fused_operators": fired,
            "unfused_seconds": round(seconds["model.onnx"], 4), "fused_seconds": round(seconds[FUSED_ONNX], 4),
            "max_abs_difference": difference}


def onnx_int8_variant(onnx_folder: Path, folder: Path, weights: str = "model.onnx", **extra) -> Path:
    """ONNX Runtime's dynamic quantization of the exported graph (int8 weights, MatMul → MatMulInteger,
    a fused Attention → QAttention). ``weights``: the graph in ``onnx_folder`` to quantize (the fused one
    where fusion was kept: ONNX Runtime's documented order is fuse, then quantize); ``extra`` goes into
    ``variant.json``."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_onnxruntime_tools():  # shape inference does not type the fused ops' (com.microsoft) outputs: fp32
        quantize_dynamic(str(onnx_folder / weights), str(folder / "model.onnx"), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    shutil.copy(onnx_folder / "config.json", folder / "config.json")
    copy_tokenizer(onnx_folder, folder)
    return describe(folder, "onnx_int8", "onnxruntime", "model.onnx", **extra)


# ---------------------------------------------------------------- training loop shared by distillation and pruning


def train_steps(model, data: Encoded, extra: dict[str, list], loss_fn: Callable, steps_per_epoch: int,
                epochs: int, batch_size: int, learning_rate: float, weight_decay: float, warmup: float,
                seed: int, pad_id: int, curve, log_every: int, label: str = "training",
                bf16: bool = False) -> list[dict]:
    """AdamW with warm-up and linear decay over ``epochs × steps_per_epoch`` length-bucketed batches.

    ``extra`` holds per-row values (teacher logits, ...) that go into the batch beside the token ids;
    ``loss_fn(model, batch)`` returns (loss, {name: float}). Returns the logged rows. Progress is shown
    as ``label`` (a bar on a terminal, log lines elsewhere). ``bf16``: the forward pass under bf16 autocast
    (the weights and the optimizer stay fp32).
    """
    optimizer = tr.adamw(model, learning_rate, weight_decay)
    total = max(steps_per_epoch * epochs, 1)
    lengths = [len(ids) for ids in data.input_ids]
    rows, sums, step = [], {}, 0
    progress = Progress(label, total)
    model.train()
    for epoch in range(epochs):
        order = tr.epoch_order(lengths, batch_size, seed, epoch)
        for start in range(0, min(len(order), steps_per_epoch * batch_size) - batch_size + 1, batch_size):
            indices = order[start:start + batch_size]
            batch = data.batch(indices, pad_id)
            batch.update({key: torch.as_tensor(np.asarray(column)[indices]) for key, column in extra.items()})
            lr = tr.set_lr(optimizer, learning_rate, tr.lr_factor(step / total, warmup))
            with tr.autocast(bf16):
                loss, parts = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(step, loss=f"{loss.item():.4f}")
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value
            if step % log_every == 0 or step == total:
                count = log_every if step % log_every == 0 else step % log_every
                row = {"step": step, "epoch": epoch + 1, **{k: round(v / count, 5) for k, v in sums.items()},
                       "lr": f"{lr:.3e}"}
                curve.write(**row)
                rows.append(row)
                sums = {}
    progress.close()
    model.eval()
    return rows


# ---------------------------------------------------------------- distillation


def student_config(teacher: PretrainedConfig, shape) -> PretrainedConfig:
    """The teacher's config with the student's depth/width where ``shape`` (StudentParams) sets them."""
    config = copy.deepcopy(teacher)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        value = getattr(shape, key)
        if value is not None:
            setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise InputError(f"optimize.distill.student: hidden_size {config.hidden_size} is not a multiple of "
                         f"num_attention_heads {config.num_attention_heads}")
    return config


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers for the student's layers (4 → 2: layers 0 and 2, as DistilBERT)."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def initialize_student(student: PreTrainedModel, source: dict[str, torch.Tensor],
                       source_layers: int) -> dict:
    """Copy ``source`` weights into the student wherever name (after layer mapping) and shape agree."""
    mapping = layer_map(source_layers, student.config.num_hidden_layers)
    own = student.state_dict()
    copied = 0
    for name, tensor in own.items():
        origin = name
        if ".encoder.layer." in name:
            prefix, rest = name.split(".encoder.layer.", 1)
            index, tail = rest.split(".", 1)
            origin = f"{prefix}.encoder.layer.{mapping[int(index)]}.{tail}"
        if origin in source and source[origin].shape == tensor.shape:
            own[name] = source[origin].clone()
            copied += tensor.numel()
    student.load_state_dict(own)
    total = sum(t.numel() for t in own.values())
    return {"layers_from": mapping, "initialized_share": round(copied / total, 4)}


def distillation_loss(temperature: float, alpha: float) -> Callable:
    """alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, label) on the labeled rows.

    Rows with label −1 (unlabeled corpus sentences) contribute only to the soft term.
    """

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits.float()
        soft = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(batch["teacher"] / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature ** 2
        labeled = batch["labels"] >= 0
        hard = F.cross_entropy(logits[labeled], batch["labels"][labeled]) if labeled.any() else logits.sum() * 0
        return alpha * soft + (1 - alpha) * hard, {"soft_loss": soft.item(), "hard_loss": hard.item()}

    return loss_fn


def distill(teacher_config: PretrainedConfig, init_weights: dict | None, init_layers: int, data: Encoded,
            teacher_logits: np.ndarray, params, pad_id: int, curve, bf16: bool = False) -> tuple[PreTrainedModel, dict]:
    """Train the student on the teacher's softened outputs mixed with the true labels."""
    torch.manual_seed(params.seed)
    student = AutoModelForSequenceClassification.from_config(student_config(teacher_config, params.student))
    set_attention(student, "eager")
    init = initialize_student(student, init_weights, init_layers) if init_weights is not None else {
        "initialized_share": 0.0}
    started = time.perf_counter()
    rows = train_steps(student, data, {"teacher": teacher_logits}, distillation_loss(params.temperature, params.alpha),
                       len(data.labels) // params.batch_size, params.epochs, params.batch_size, params.learning_rate,
                       params.weight_decay, params.warmup_fraction, params.seed, pad_id, curve, params.log_every,
                       "optimize student (distillation)", bf16)
    return student, {**init, "rows": len(data.labels), "steps": rows[-1]["step"] if rows else 0,
                     "first_loss": rows[0]["loss"] if rows else None, "last_loss": rows[-1]["loss"] if rows else None,
                     "seconds": round(time.perf_counter() - started, 1),
                     "parameters": sum(p.numel() for p in student.parameters())}


# ---------------------------------------------------------------- pruning


def prunable(model: PreTrainedModel) -> list[tuple[torch.nn.Module, str]]:
    return [(module, "weight") for module in model.bert.encoder.modules() if isinstance(module, torch.nn.Linear)]


def prune_magnitude(model: PreTrainedModel, data: Encoded, params, pad_id: int, curve,
                    log_every: int, bf16: bool = False) -> tuple[PreTrainedModel, dict]:
    """Global L1 (magnitude) pruning of the encoder's linear weights, then a recovery fine-tune with the
    mask held; the zeros are made permanent. Unstructured: dense kernels run as before (see the figures)."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    set_attention(pruned, "eager")
    targets = prunable(pruned)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=params.sparsity)
    torch.manual_seed(params.seed)
    rows = []
    if params.recovery_steps:
        steps_per_epoch = max(len(data.labels) // params.batch_size, 1)
        epochs = -(-params.recovery_steps // steps_per_epoch)
        rows = train_steps(pruned, data, {}, cross_entropy_loss, min(steps_per_epoch, params.recovery_steps), epochs,
                           params.batch_size, params.learning_rate, 0.0, 0.0, params.seed, pad_id, curve, log_every,
                           "optimize pruned (recovery)", bf16)
    for module, name in targets:
        prune.remove(module, name)
    weights = [module.weight for module, _ in targets]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return pruned.eval(), {"sparsity": round(zeros / sum(w.numel() for w in weights), 4),
                           "recovery_steps": rows[-1]["step"] if rows else 0}


def cross_entropy_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).logits
    return F.cross_entropy(logits.float(), batch["labels"]), {}
