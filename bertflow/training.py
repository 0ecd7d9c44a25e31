"""Training-loop pieces shared by pretrain and finetune: optimizer, schedule, precision, metrics, checkpoints.

Writes only where it is told: checkpoint folders (atomically) and metric CSVs (streamed, one row at
a time, so ``dvc plots`` can draw a run while it goes). Nothing here knows a particular stage.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bertflow.io import InputError, atomic_dirs, read_json, write_json
from bertflow.progress import Progress, fraction_done

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


# ---------------------------------------------------------------- set-up


def set_threads(num_threads: int | None) -> int:
    """``num_threads``, or this process's share of the cores (torchrun starts LOCAL_WORLD_SIZE per node)."""
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(num_threads or max(1, share))
    return torch.get_num_threads()


def cpu_supports_bf16() -> bool:
    """True on processors with native bf16 arithmetic (AVX512-BF16 or AMX), where autocast pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(setting: bool | str, device: torch.device = CPU) -> bool:
    """``auto``: bf16 where the device computes it natively (a recent CPU; a GPU from Ampere on)."""
    if setting != "auto":
        return bool(setting)
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()


def autocast(enabled: bool, device: torch.device = CPU):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch (built on the CPU) on the model's device; on the CPU the same tensors."""
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and on LayerNorm parameters, the norms found by their module type
    (MegatronBert names its LayerNorms ``ln``, which a match on ``LayerNorm`` in the name misses)."""
    norms = {id(param) for module in model.modules() if isinstance(module, torch.nn.LayerNorm)
             for param in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or id(param) in norms else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float, **options) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups``, fused: one kernel over all parameters (BERT-Mini/30522 on two
    CPU cores: 14 ms per optimizer step instead of 32 ms)."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, fused=True, **options)


def lr_factor(progress: float, warmup_fraction: float) -> float:
    """Linear warm-up to 1 over ``warmup_fraction`` of the run, then linear decay to 0 at its end."""
    if progress < warmup_fraction:
        return progress / warmup_fraction
    return max(0.0, (1.0 - progress) / max(1.0 - warmup_fraction, 1e-12))


@dataclass
class Budget:
    """A run's length in optimizer steps or wall-clock minutes; progress runs from 0 to 1.

    With minutes, the schedule is laid over the time budget (as Cramming does): the learning rate
    follows elapsed time, so the run ends decayed whenever the budget runs out. With both, progress
    is that of whichever runs out first; with neither, it stays 0 (no budget, never spent).
    """

    max_steps: int | None = None
    minutes: float | None = None

    def progress(self, step: int, seconds: float) -> float:
        return fraction_done(step, seconds, self.max_steps, self.minutes)

    def reporter(self, label: str, state_step: int = 0, state_seconds: float = 0.0, enabled: bool = True) -> Progress:
        """Progress of a loop run over this budget (a bar on a terminal, log lines elsewhere; bertflow/progress.py),
        from where it stands (a resumed run's step and seconds)."""
        return Progress(label, self.max_steps, self.minutes, start_step=state_step, start_seconds=state_seconds,
                        enabled=enabled)

    def spent(self, step: int, seconds: float) -> bool:
        return self.progress(step, seconds) >= 1.0


def set_lr(optimizer: torch.optim.Optimizer, peak: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = peak * factor
    return peak * factor


# ---------------------------------------------------------------- batch order


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, pool: int = 50) -> list[int]:
    """A shuffled order whose consecutive ``batch_size`` groups have similar lengths (little padding).

    Rows are shuffled, cut into pools of ``pool`` batches, sorted by length inside each pool, cut into
    batches, and the batches shuffled; the ragged tail is dropped so every batch is full.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * pool
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_initialized():  # dropout on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """The generators as they were; CUDA's only where the checkpoint has them for as many devices."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- metrics


class MetricsLog:
    """A CSV that grows one row at a time; on resume the rows past the checkpoint are dropped. Each row also
    gets ``time``, the wall clock (epoch seconds) when it was written: tracking gives the point that time."""

    def __init__(self, path: Path, fields: list[str], resume_after_step: int | None = None):
        self.path, self.fields = path, [*fields, *(["time"] if "time" not in fields else [])]
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_after_step is not None and path.is_file():
            with open(path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_after_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, restval="")  # a row from before `time`: none
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields).writerow({"time": round(time.time(), 3), **row})


class NullLog:
    """Where the metrics of a process other than rank 0 go."""

    def write(self, **row) -> None:
        pass


def metrics_log(path: Path, fields: list[str], resume_after_step: int | None, writer: bool) -> MetricsLog | NullLog:
    """The metrics CSV for the writing process (rank 0), a null log for the others."""
    return MetricsLog(path, fields, resume_after_step) if writer else NullLog()


# ---------------------------------------------------------------- checkpoints


@dataclass
class CheckpointStore:
    """Checkpoints ``step-NNNNNNNN/`` under ``folder``, tied to the run that made them.

    ``run.json`` records a fingerprint of everything that shapes the run (model config, training
    params, data). A different run is refused while its checkpoints are unfinished (they may hold
    hours of work and the change may be a mistake); a finished run's checkpoints are cleared.
    """

    folder: Path
    fingerprint: dict
    keep: int = 2
    _saved_at: float = field(default_factory=time.monotonic)

    def open(self) -> Path | None:
        """Check ownership of the folder; return the latest checkpoint to resume from, if any."""
        run_file = self.folder / "run.json"
        if run_file.is_file():
            recorded = read_json(run_file)
            if recorded["fingerprint"] != self.fingerprint:
                if not recorded.get("complete"):
                    raise InputError(self._mismatch(recorded["fingerprint"]))
                log.info("clearing %s: its checkpoints belong to an earlier, finished run", self.folder)
                shutil.rmtree(self.folder)
            elif recorded.get("complete"):
                shutil.rmtree(self.folder)  # same run finished before: start clean, reproduce it
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(run_file, {"fingerprint": self.fingerprint, "complete": False})
        steps = sorted(self.folder.glob("step-*"))
        return steps[-1] if steps else None

    def __post_init__(self):
        self.fingerprint = json.loads(json.dumps(self.fingerprint))  # as run.json will hold it (tuples → lists)

    def _mismatch(self, recorded: dict) -> str:
        now, then = _flatten(self.fingerprint), _flatten(recorded)
        diffs = [f"{key}: {then.get(key)!r} there, {value!r} now"
                 for key, value in now.items() if then.get(key) != value]
        diffs += [f"{key}: {value!r} there, absent now" for key, value in then.items() if key not in now]
        return (f"{self.folder}: holds checkpoints of an unfinished run with a different configuration "
                f"({'; '.join(diffs[:6])}); refusing to load them. Restore those settings to resume, "
                f"or delete {self.folder} to start over")

    def due(self, step: int, every_steps: int | None, every_minutes: float | None) -> bool:
        by_steps = bool(every_steps) and step % every_steps == 0
        by_time = bool(every_minutes) and time.monotonic() - self._saved_at >= 60 * every_minutes
        return by_steps or by_time

    def save(self, step: int, state: dict) -> Path:
        target = self.folder / f"step-{step:08d}"
        with atomic_dirs([target]) as (tmp,):
            torch.save(state, tmp / "state.pt")
        self._saved_at = time.monotonic()
        for old in sorted(self.folder.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    @staticmethod
    def load(path: Path) -> dict:
        """The saved state on the CPU, whatever device saved it; ``load_state_dict`` moves it to the
        model's device, so a run resumes on a GPU, on the CPU or on a different GPU count."""
        return torch.load(path / "state.pt", weights_only=False, map_location="cpu")

    def mark_complete(self) -> None:
        write_json(self.folder / "run.json", {"fingerprint": self.fingerprint, "complete": True})


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
