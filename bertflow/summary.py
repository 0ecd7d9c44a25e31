"""The three lines that end ``make run`` (``bertflow-flow run``), after the stage table: what a user ran it for.

1. the test accuracy beside the baselines, and whether pretraining paid (the model card's sentence);
2. the registry's decision with the model URI;
3. where the run report is.

Reads ``reports/evaluate.json``, ``reports/register.json`` and whether ``reports/report.html`` exists
(``closing_text``); ``closing_lines`` is the pure part. Writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from bertflow.cards import BASELINES, interval_text, points, pretraining_verdict
from bertflow.paths import Paths


def test_line(evaluation: dict) -> str:
    """'Test accuracy 80.2 % [77.5, 82.8] beside majority class 50.9 %, ... Pretraining paid: ...'."""
    test = evaluation.get("test", {})
    if "accuracy" not in test:
        return "Test: no figures (reports/evaluate.json is missing or has no test accuracy)"
    baselines = [f"{BASELINES.get(name, name)} {100 * figures['accuracy']:.1f} %"
                 for name, figures in evaluation.get("baselines", {}).items() if "accuracy" in figures]
    line = f"Test accuracy {interval_text(test)}" + (f" beside {', '.join(baselines)}." if baselines else ".")
    return f"{line} {pretraining_text(evaluation)}"


def pretraining_text(evaluation: dict) -> str:
    """Whether pretraining paid: the card's sentence (paired test over the seeds), the bare difference for a
    report from before that test, or why it was not measured."""
    verdict = pretraining_verdict(evaluation)
    if verdict:
        return verdict
    random_init = evaluation.get("baselines", {}).get("random_init", {})
    if "accuracy" in random_init:
        return (f"Pretraining: {points(evaluation['test']['accuracy'] - random_init['accuracy'])} over the same "
                "fine-tuning from random weights (no paired test in this report).")
    return "Whether pretraining paid was not measured (finetune.random_init_ablation is off)."


def registry_line(registered: dict, register_ran: bool = True) -> str:
    """'Registry: models:/name/3 registered as champion (why)'; says so when the decision is an earlier run's."""
    if not registered.get("model_uri"):
        return "Registry: nothing registered (reports/register.json is missing)"
    line = f"Registry: {registered['model_uri']} registered as {registered.get('decision', '?')}"
    if registered.get("reason"):
        line += f" ({registered['reason']})"
    if not register_ran:
        line += "; decided by an earlier run: register had nothing new"
    return line


def report_line(page: Path, written: bool) -> str:
    return f"Report: {page}" if written else f"Report: not written ({page} is missing)"


def closing_lines(evaluation: dict, registered: dict, page: Path, page_written: bool,
                  register_ran: bool = True) -> list[str]:
    """The three closing lines from the evaluate and register reports (empty dicts where missing)."""
    return [test_line(evaluation), registry_line(registered, register_ran), report_line(page, page_written)]


def closing_text(root: Path, outcomes: list[dict] | None = None) -> str:
    """``closing_lines`` for the project at ``root``; ``outcomes`` (the flow's, stage/ran) say whether register ran."""
    paths = Paths(Path(root).resolve())
    reports = {stage: json.loads(paths.report(stage).read_text()) if paths.report(stage).is_file() else {}
               for stage in ("evaluate", "register")}
    register_ran = any(o["stage"] == "register" and o["ran"] for o in outcomes) if outcomes is not None else True
    page = paths.reports / "report.html"
    return "\n".join(closing_lines(reports["evaluate"], reports["register"], page, page.is_file(), register_ran))
