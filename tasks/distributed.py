"""Training across processes with PyTorch's own engine (torchrun + DistributedDataParallel).

World size 1 is the plain single-process run, through the same code: ``World()`` is rank 0 of 1,
and every collective below is the identity there. Under ``torchrun`` the world comes from its
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); the backend is ``gloo``, as the training
stages compute on the CPU (``nccl`` waits for them to place tensors on GPUs). ``launch_command``
is how the ``bertflow`` command re-runs itself through torchrun
when ``distributed.nproc_per_node`` (or ``nnodes``) asks for more than one process.

Reads the torchrun environment; writes nothing. Only rank 0 writes files (the stages check
``World.main``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tasks.io import InputError

LAUNCHED = "BERTFLOW_DISTRIBUTED"  # set by the launcher, so a rank never launches again
BACKEND = "BERTFLOW_BACKEND"


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def backend(setting: str = "auto") -> str:
    """``auto``: gloo, since the training stages compute on the CPU (nccl needs tensors on GPUs)."""
    return "gloo" if setting == "auto" else setting


def init_world() -> World:
    """Join the process group torchrun set up (once per process); world size 1 joins nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend(os.environ.get(BACKEND, "auto")))
    return World(size=dist.get_world_size(), rank=dist.get_rank())


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there is more than one process, else itself."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

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
    tensor = torch.tensor([value], dtype=torch.float64)
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
    tensor = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(tensor)
    if mean:
        tensor /= world.size
    return tensor.tolist()


def open_checkpoints(store, world: World):
    """Rank 0 opens the checkpoint store (it may clear or claim it); every rank gets the checkpoint to resume."""
    return broadcast_object(store.open() if world.main else None, world)


# ---------------------------------------------------------------- launching


def wants_launch(settings) -> bool:
    """More than one process asked for, and this process is not one of them yet."""
    return settings.nproc_per_node * settings.nnodes > 1 and LAUNCHED not in os.environ


def launch_command(settings, argv: Sequence[str]) -> list[str]:
    """``torchrun`` re-running this ``bertflow`` command line, one node's share of the processes."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={settings.nproc_per_node}"]
    if settings.nnodes == 1:
        command.append("--standalone")
    else:
        if not settings.rdzv_endpoint:
            raise InputError("distributed.nnodes > 1 needs distributed.rdzv_endpoint (host:port of the rendezvous)")
        command += [f"--nnodes={settings.nnodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={settings.rdzv_endpoint}", f"--rdzv-id={settings.rdzv_id}"]
    return [*command, "-m", "tasks.cli", *argv]


def launch_env(settings) -> dict:
    return {**os.environ, LAUNCHED: "1", BACKEND: settings.backend}


def is_main_process() -> bool:
    """Rank 0 (or no torchrun at all): the one process that writes reports."""
    return int(os.environ.get("RANK", "0")) == 0
