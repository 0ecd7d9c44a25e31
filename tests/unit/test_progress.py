"""bertflow/progress.py: fraction, ETA (step cap or time budget, whichever ends first), the line format, and
when lines are written; a fake clock stands in for time, so every figure is a known answer."""

import io
import logging

import pytest

from bertflow.progress import Progress, eta_seconds, format_duration, fraction_done, line_due, status_text
from bertflow.training import Budget


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fraction_is_that_of_the_nearer_end_and_the_training_budget_says_the_same():
    assert fraction_done(25, 30.0, 100, None) == 0.25
    assert fraction_done(25, 30.0, None, 1.0) == 0.5
    assert fraction_done(25, 30.0, 100, 1.0) == 0.5  # the budget ends first
    assert fraction_done(90, 30.0, 100, 1.0) == 0.9  # the step cap ends first
    assert fraction_done(200, 600.0, 100, 1.0) == 1.0
    assert fraction_done(5, 5.0, None, None) == 0.0
    assert Budget(100, 1.0).progress(90, 30.0) == fraction_done(90, 30.0, 100, 1.0)


def test_eta_takes_whichever_end_comes_first_at_the_pace_so_far():
    # 20 steps in 10 s: 80 steps to go at 2 steps/s
    assert eta_seconds(20, 10.0, 10.0, 100, None) == pytest.approx(40.0)
    # a 1-minute budget counted in training seconds, which advance at half the wall clock (evaluations)
    assert eta_seconds(20, 10.0, 20.0, None, 1.0) == pytest.approx(100.0)
    # both: the budget ends in 100 s, the step cap in 80 × 1 s = 80 s
    assert eta_seconds(20, 10.0, 20.0, 100, 1.0) == pytest.approx(80.0)
    # a resumed run: only this process's 10 steps (from step 50) in 5 s set the pace
    assert eta_seconds(60, 60.0, 5.0, 100, None, start_step=50, start_seconds=55.0) == pytest.approx(20.0)
    assert eta_seconds(0, 0.0, 0.0, 100, 1.0) is None  # no pace yet
    assert eta_seconds(120, 61.0, 70.0, 100, 1.0) == 0.0  # past the end: never negative


def test_durations_and_the_status_text():
    assert [format_duration(s) for s in (0.4, 59.4, 60, 3599, 3600, 7620, None, float("inf"))] == [
        "0s", "59s", "1m00s", "59m59s", "1h00m", "2h07m", "?", "?"]
    assert status_text(20, 10.0, 10.0, 100, None, figures={"loss": "2.5000", "tokens_per_s": "900"}) == (
        "step 20/100 | 2.0 steps/s | 10s elapsed, ETA 40s | loss 2.5000 tokens/s 900")
    assert status_text(20, 30.0, 40.0, None, 2.0) == (
        "step 20 | 30s of 2m00s budget | 2.0 s/step | 40s elapsed, ETA 2m00s")
    assert status_text(0, 0.0, 0.0, 100, None) == "step 0/100 | ? steps/s | 0s elapsed, ETA ?"


def test_a_line_is_due_after_the_interval_or_at_each_ten_percent_mark():
    assert not line_due(10.0, 0.0, 0.15, 0.11)
    assert line_due(30.0, 0.0, 0.15, 0.11)  # 30 s since the last line
    assert line_due(10.0, 0.0, 0.2, 0.19)  # passed 20 %
    assert all(line_due(1.0, 0.0, k / 70, (k - 1) / 70) == (k * 10 // 70 > (k - 1) * 10 // 70)
               for k in range(1, 71))  # float noise neither hides a mark nor makes one twice
    assert line_due(1.0, 0.0, 0.25, 0.2, every_seconds=5, every_percent=25)
    assert not line_due(4.9, 0.0, 0.24, 0.0, every_seconds=5, every_percent=25)


def test_lines_when_not_a_terminal(caplog):
    clock = Clock()
    progress = Progress("train", max_steps=100, file=io.StringIO(), clock=clock)
    assert progress.bar is None  # StringIO is no terminal
    with caplog.at_level(logging.INFO, logger="bertflow.progress"):
        for step in range(1, 101):
            clock.now += 0.5
            progress.update(step, loss=f"{1 / step:.3f}")
        progress.close()
    lines = [record.getMessage() for record in caplog.records]
    # the first step, then each 10 % mark (steps 10, 20, ..., 100), then the closing line; no repeats
    assert lines[0] == "train: 1% | step 1/100 | 2.0 steps/s | 0s elapsed, ETA 50s | loss 1.000"
    assert lines[1] == "train: 10% | step 10/100 | 2.0 steps/s | 5s elapsed, ETA 45s | loss 0.100"
    assert lines[-2] == "train: 100% | step 100/100 | 2.0 steps/s | 50s elapsed, ETA 0s | loss 0.010"
    assert lines[-1] == "train: done in 50s (step 100)"
    assert len(lines) == 12


def test_a_slow_loop_writes_a_line_every_interval_with_the_budget_as_its_end(caplog):
    clock = Clock()
    progress = Progress("slow", minutes=60.0, file=io.StringIO(), clock=clock, every_seconds=30)
    with caplog.at_level(logging.INFO, logger="bertflow.progress"):
        for step in range(1, 11):  # 10 s a step, 100 s in all: under 10 % of the budget, so time decides
            clock.now += 10
            progress.update(step)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" | ")[1] for line in lines] == ["step 1", "step 4", "step 7", "step 10"]
    assert lines[-1] == "slow: 3% | step 10 | 1m40s of 1h00m budget | 10.0 s/step | 1m40s elapsed, ETA 58m20s"


def test_a_bar_on_a_terminal_and_nothing_when_disabled(caplog):
    out = io.StringIO()
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="bertflow.progress"):
        with Progress("bar", max_steps=10, file=out, interactive=True, clock=clock) as progress:
            for step in range(1, 11):
                clock.now += 1
                progress.update(step, loss="0.5")
        silent = Progress("quiet", max_steps=10, file=out, interactive=True, enabled=False, clock=clock)
        silent.update(5)
        silent.close()
    text = out.getvalue()
    assert "bar: 100%|" in text and "| step 10/10 | 1.0 steps/s | 10s elapsed, ETA 0s | loss 0.5" in text
    assert ", step" not in text
    assert "quiet" not in text
    assert not caplog.records  # a bar replaces the lines
