"""Re-running the ``bertflow`` command under torchrun, and what a rank knows of its launcher.

``launch_command`` is how ``bertflow <stage>`` becomes torchrun when ``distributed.nproc_per_node``
(or ``nnodes``) asks for more than one process; ``follow_launcher`` ends a rank with that torchrun;
``is_main_process`` says which process writes. Torch-free (torch is imported only to check a launch's
devices), so the CLI's start-up costs a stage that trains nothing no torch import.

Reads the environment (``RANK``, the variables below); writes nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

from bertflow.io import InputError

LAUNCHED = "BERTFLOW_DISTRIBUTED"  # set by the launcher, so a rank never launches again
BACKEND = "BERTFLOW_BACKEND"
LAUNCHER = "BERTFLOW_LAUNCHER_PID"  # the bertflow command that became torchrun: the ranks' parent
PR_SET_PDEATHSIG = 1  # linux/prctl.h

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


def check_launch(settings, device_setting: str, what: str) -> str:
    """Before starting processes: every local rank has a device and the backend suits them; the backend."""
    import torch

    from bertflow.distributed import backend, select_device

    device = select_device(device_setting, settings.nproc_per_node - 1, torch.cuda.device_count(), what)
    return backend(settings.backend, device)


def launch_env(settings) -> dict:
    return {**os.environ, LAUNCHED: "1", BACKEND: settings.backend, LAUNCHER: str(os.getpid())}


def follow_launcher() -> None:
    """End this rank when its torchrun ends, even by SIGKILL (which torchrun cannot pass on): Linux
    sends the rank SIGTERM when its parent dies (PR_SET_PDEATHSIG). Only for ranks our launcher
    started (a torchrun run by hand is the user's to manage), and only on Linux."""
    launcher = os.environ.get(LAUNCHER)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    try:
        os.kill(int(launcher), 0)
    except ProcessLookupError:  # it died before the request above: nobody would send the signal
        raise SystemExit(f"rank {os.environ.get('RANK')}: its torchrun (pid {launcher}) has ended") from None


def is_main_process() -> bool:
    """Rank 0 (or no torchrun at all): the one process that writes reports."""
    return int(os.environ.get("RANK", "0")) == 0
