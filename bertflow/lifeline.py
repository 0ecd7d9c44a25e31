"""A stage command ends with the flow that started it, even when the flow is killed with SIGKILL.

The Prefect flow starts each ``dvc repro`` in a process group of its own and names itself in
``$BERTFLOW_FLOW`` (``<pid> <start time>``). ``bertflow <stage>`` (and every torchrun rank of it) then
watches that process; once it is gone, the stage's whole group (dvc, the shell, the stage, its ranks) is
killed, so nothing keeps running, or holding DVC's lock, after the flow that owned it. What it killed
had written nothing half-way (outputs are renamed into place whole), and the next run starts cleanly.
Reads /proc; writes nothing.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "BERTFLOW_FLOW"
POLL_SECONDS = 0.2


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def identity(pid: int | None = None) -> str:
    """What the flow puts in ``$BERTFLOW_FLOW``: its pid and start time (a reused pid is not the flow)."""
    pid = pid or os.getpid()
    return f"{pid} {process_start(pid)}"


def alive(value: str) -> bool:
    pid, started = value.split()
    return process_start(int(pid)) == started


def follow_flow() -> threading.Thread | None:
    """When started by the flow, kill this process group as soon as the flow is gone (a daemon thread)."""
    value = os.environ.get(ENV)
    if not value or not os.path.isdir("/proc") or os.getpgrp() == int(value.split()[0]):
        return None  # not under the flow, no /proc, or the flow's own group: never kill that

    def watch() -> None:
        while alive(value):
            time.sleep(POLL_SECONDS)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="bertflow-lifeline", daemon=True)
    thread.start()
    return thread
