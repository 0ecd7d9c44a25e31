"""Progress of a long loop (pretraining, fine-tuning, the LSTM baseline, distillation) with an ETA.

On a terminal a live tqdm bar; anywhere else (a pipe: the Prefect flow copies every output line of a
stage into its task log, a file, CI) one log line every ``every_seconds`` and at every ``every_percent``
of the way, e.g. ``pretrain: 40% | step 240/600 | 3.1 steps/s | 1m17s elapsed, ETA 1m56s | loss 5.1203``.
Both show the same text. The loop ends at its step cap or its time budget, whichever comes first, and
so does the ETA: the pace so far (wall clock) carried to the nearer end. Writes to standard error (the
bar) or the ``bertflow.progress`` logger (the lines); reads nothing.

    progress = Progress("pretrain", max_steps=600, minutes=None)
    for step in range(1, 601):
        ...
        progress.update(step, loss=f"{loss:.4f}")
    progress.close()
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
EVERY_SECONDS = 30.0  # a line at least this often when output is not a terminal
EVERY_PERCENT = 10  # and one each time the loop passes another 10 % of the way
BAR = "{desc}: {percentage:3.0f}%|{bar}| "  # then the status text


# ---------------------------------------------------------------- figures (pure)


def fraction_done(step: int, seconds: float, max_steps: int | None, minutes: float | None) -> float:
    """How far a loop with a step cap and/or a time budget is, 0 to 1: the nearer end decides.

    >>> fraction_done(30, 90.0, 100, 5.0)   # 30 % of the steps, 30 % of the minutes
    0.3
    """
    parts = [step / max_steps] if max_steps else []
    parts += [seconds / (60 * minutes)] if minutes else []
    return min(1.0, max(parts, default=0.0))


def eta_seconds(step: int, seconds: float, elapsed: float, max_steps: int | None, minutes: float | None,
                start_step: int = 0, start_seconds: float = 0.0) -> float | None:
    """Wall-clock seconds left until the step cap or the time budget ends the loop, whichever comes first,
    at the pace of this process so far (``elapsed`` wall seconds took it from ``start_step``/``start_seconds``
    to ``step``/``seconds``; ``seconds`` is what the budget counts). None before there is a pace to go by.

    >>> eta_seconds(30, 30.0, 60.0, 100, None)  # 30 steps in a minute, 70 to go
    140.0
    >>> eta_seconds(30, 30.0, 60.0, 100, 1.0)   # but the budget's last 30 s come first (at half speed)
    60.0
    """
    left = []
    if max_steps and step > start_step:
        left.append((max_steps - step) * elapsed / (step - start_step))
    if minutes and seconds > start_seconds:
        left.append((60 * minutes - seconds) * elapsed / (seconds - start_seconds))
    return max(0.0, min(left)) if left else None


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h07m``; ``?`` when unknown.

    >>> format_duration(185.2), format_duration(7620), format_duration(None)
    ('3m05s', '2h07m', '?')
    """
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def format_rate(steps: int, elapsed: float) -> str:
    """``3.1 steps/s``, or ``2.5 s/step`` for slow steps; ``?`` before a step is timed."""
    if steps <= 0 or elapsed <= 0:
        return "? steps/s"
    rate = steps / elapsed
    return f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step"


def status_text(step: int, seconds: float, elapsed: float, max_steps: int | None, minutes: float | None,
                start_step: int = 0, start_seconds: float = 0.0, figures: dict | None = None) -> str:
    """Everything after the percentage: done/total (steps, and minutes of a budget), rate, elapsed, ETA, figures.

    >>> status_text(30, 30.0, 60.0, 100, None, figures={"loss": "2.5000"})
    'step 30/100 | 2.0 s/step | 1m00s elapsed, ETA 2m20s | loss 2.5000'
    """
    parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}"]
    if minutes:
        parts.append(f"{format_duration(seconds)} of {format_duration(60 * minutes)} budget")
    parts.append(format_rate(step - start_step, elapsed))
    eta = eta_seconds(step, seconds, elapsed, max_steps, minutes, start_step, start_seconds)
    parts.append(f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}")
    if figures:
        parts.append(" ".join(f"{name.replace('_per_', '/')} {value}" for name, value in figures.items()))
    return " | ".join(parts)


def line_due(now: float, last_time: float, fraction: float, last_fraction: float,
             every_seconds: float = EVERY_SECONDS, every_percent: float = EVERY_PERCENT) -> bool:
    """A new progress line: ``every_seconds`` since the last, or the loop passed another ``every_percent`` mark."""
    mark = math.floor(100 * fraction / every_percent + 1e-9)
    return now - last_time >= every_seconds or mark > math.floor(100 * last_fraction / every_percent + 1e-9)


# ---------------------------------------------------------------- the reporter


class Progress:
    """A loop's progress: a tqdm bar when ``file`` (standard error) is a terminal, else log lines.

    ``update(step, seconds)`` after each step; ``seconds`` is what a time budget counts (a loop's training
    time, without evaluations), by default the wall clock since this object was made (plus ``start_seconds``).
    A resumed loop passes where it resumed (``start_step``, ``start_seconds``): the pace counts this
    process's steps only. ``enabled=False`` (ranks other than 0) shows nothing.
    """

    def __init__(self, label: str, max_steps: int | None = None, minutes: float | None = None, *,
                 start_step: int = 0, start_seconds: float = 0.0, enabled: bool = True, file=None,
                 interactive: bool | None = None, every_seconds: float = EVERY_SECONDS,
                 every_percent: float = EVERY_PERCENT, clock: Callable[[], float] = time.monotonic):
        self.label, self.max_steps, self.minutes = label, max_steps, minutes
        self.start_step, self.start_seconds, self.enabled = start_step, start_seconds, enabled
        self.every_seconds, self.every_percent, self.clock = every_seconds, every_percent, clock
        self.started = clock()
        self.step, self.seconds = start_step, start_seconds
        self.last_time, self.last_fraction, self.shown_step = self.started, self.fraction(), None
        self.figures: dict = {}
        self.closed = False
        file = sys.stderr if file is None else file
        if interactive is None:
            interactive = bool(getattr(file, "isatty", lambda: False)())
        self.bar = self._open_bar(file) if enabled and interactive else None

    def _open_bar(self, file):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # the loop's own log lines (pretrain's losses, evaluations) print above the bar instead of through it
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        return tqdm(total=1000, initial=int(1000 * self.fraction()), desc=self.label, file=file, mininterval=1,
                    bar_format=BAR, dynamic_ncols=True)

    def fraction(self) -> float:
        return fraction_done(self.step, self.seconds, self.max_steps, self.minutes)

    def text(self) -> str:
        """The status as a line shows it (the bar shows the same after its percentage)."""
        return f"{self.label}: {100 * self.fraction():.0f}% | " + status_text(
            self.step, self.seconds, self.clock() - self.started, self.max_steps, self.minutes, self.start_step,
            self.start_seconds, self.figures)

    def update(self, step: int, seconds: float | None = None, **figures) -> None:
        """The loop has done ``step`` steps (and ``seconds`` of its budget); ``figures`` shown beside (loss=...)."""
        if not self.enabled:
            return
        now = self.clock()
        self.step = step
        self.seconds = self.start_seconds + (now - self.started) if seconds is None else seconds
        self.figures = figures
        if self.bar is not None:  # the status goes into the format itself: tqdm's {postfix} starts with ", "
            text = status_text(self.step, self.seconds, now - self.started, self.max_steps, self.minutes,
                               self.start_step, self.start_seconds, figures)
            self.bar.bar_format = BAR + text.replace("{", "{{").replace("}", "}}")
            self.bar.update(int(1000 * self.fraction()) - self.bar.n)
            return
        first = self.shown_step is None
        if first or line_due(now, self.last_time, self.fraction(), self.last_fraction, self.every_seconds,
                             self.every_percent):
            self._emit(now)

    def _emit(self, now: float) -> None:
        log.info("%s", self.text())
        self.last_time, self.last_fraction, self.shown_step = now, self.fraction(), self.step

    def close(self, note: str = "done") -> None:
        """End the bar, or write the last line (unless the last update was just written) and ``note``."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            return
        if self.shown_step != self.step:
            self._emit(self.clock())
        log.info("%s: %s in %s (%s)", self.label, note, format_duration(self.clock() - self.started),
                 f"step {self.step}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close("stopped" if exc[0] is not None else "done")
