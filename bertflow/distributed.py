"""Training across processes with PyTorch's own engine (torchrun + DistributedDataParallel).

World size 1 is the plain single-process run, through the same code: ``World()`` is rank 0 of 1
on the CPU, and every collective below is the identity there. Under ``torchrun`` the world comes
from its environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). Each process computes on one device:
``cuda:LOCAL_RANK`` when the stage's ``device`` is ``auto`` and CUDA is there (or ``cuda``), else
the CPU; the backend follows (``nccl`` for GPUs, ``gloo`` for the CPU) unless
``distributed.backend`` names one. How the ``bertflow`` command re-runs itself through torchrun is
``bertflow.launch`` (torch-free, so a stage that trains nothing never imports torch).

Reads the torchrun environment; writes nothing. Only rank 0 writes files (the stages check
``World.main``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bertflow.io import InputError
from bertflow.launch import BACKEND, follow_launcher


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def select_device(setting: str, local_rank: int, cuda_devices: int, what: str) -> torch.device:
    """The device of the process with ``local_rank`` on its node, given the node's CUDA device count.

    ``auto``: its own GPU when the node has CUDA devices, else the CPU; ``cuda`` insists on a GPU;
    ``cpu`` keeps to the CPU. ``what`` names the setting in the messages (e.g. ``pretrain.device``).
    """
    if setting == "cpu" or (setting == "auto" and cuda_devices == 0):
        return torch.device("cpu")
    if cuda_devices == 0:
        raise InputError(f"{what}: cuda, but this machine has no CUDA device (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); set it to auto or cpu")
    if local_rank >= cuda_devices:
        raise InputError(f"distributed.nproc_per_node: process {local_rank} of this node has no GPU of its own "
                         f"(the node has {cuda_devices}); ask for at most {cuda_devices} processes per node, "
                         f"or set {what}: cpu")
    return torch.device("cuda", local_rank)


def backend(setting: str, device: torch.device) -> str:
    """``auto``: nccl between GPUs, gloo between CPU processes; nccl cannot carry CPU tensors."""
    if setting == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if setting == "nccl" and device.type != "cuda":
        raise InputError("distributed.backend: nccl needs the training on GPUs, but it runs on the CPU; "
                         "set distributed.backend to auto or gloo")
    return setting


def init_world(device_setting: str = "auto", what: str = "device") -> World:
    """Join the process group torchrun set up (once per process) on this process's device;
    world size 1 joins nothing."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_setting, local_rank, torch.cuda.device_count(), what)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's object collectives use the current device
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device)
    follow_launcher()
    if not dist.is_initialized():
        dist.init_process_group(backend(os.environ.get(BACKEND, "auto"), device))
    return World(size=dist.get_world_size(), rank=dist.get_rank(), device=device)


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier(device_ids=[world.device.index] if world.device.type == "cuda" else None)
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there is more than one process, else itself."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if world.device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[world.device.index], output_device=world.device.index)
    return DistributedDataParallel(module)


def check_split(global_batch: int, world: World, what: str) -> None:
    """A global batch (what params.yaml says) must split evenly over the processes."""
    if global_batch % world.size:
        raise InputError(f"{what}={global_batch} does not split over {world.size} processes; "
                         f"make it a multiple of the world size")


def rank_share(indices: Sequence[int], world: World) -> list[int]:
    """This rank's contiguous slice of one global batch: the ranks' slices partition it, no overlap."""
    share = len(indices) // world.size
    return list(indices[world.rank * share:(world.rank + 1) * share])


def broadcast_float(value: float, world: World) -> float:
    """Rank 0's value on every rank (the time budget must end on the same step everywhere)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)  # nccl carries GPU tensors only
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def broadcast_object(value, world: World):
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(values: Sequence[float], world: World, mean: bool) -> list[float]:
    """Sum (or mean) of each value over the ranks, for logs and counters."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    if mean:
        tensor /= world.size
    return tensor.tolist()


def open_checkpoints(store, world: World):
    """Rank 0 opens the checkpoint store (it may clear or claim it); every rank gets the checkpoint to resume."""
    return broadcast_object(store.open() if world.main else None, world)
