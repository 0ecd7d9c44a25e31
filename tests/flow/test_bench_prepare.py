"""``make bench`` on a fresh clone: a benchmark builds the outputs it measures through DVC, and only when missing.

A two-stage DVC project whose commands count their own runs: ``ensure_output`` runs ``dvc repro`` for a
missing output (DVC then builds the stage and what it needs), and neither DVC nor the stages run again when
the output is there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from benchmarks.common import ensure_output
from tests.flow.conftest import sh

COUNT = "import pathlib, sys; p = pathlib.Path('runs.log'); p.write_text(p.read_text() + sys.argv[1] + '\\n' " \
        "if p.exists() else sys.argv[1] + '\\n'); pathlib.Path(sys.argv[2]).write_text(sys.argv[1])"


def counting_project(root: Path) -> Path:
    root.mkdir()
    sh("git", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    stage = {"cmd": f'python -c "{COUNT}" {{name}} {{name}}.txt'}
    stages = {"first": {"cmd": stage["cmd"].format(name="first"), "outs": ["first.txt"]},
              "second": {"cmd": stage["cmd"].format(name="second"), "deps": ["first.txt"], "outs": ["second.txt"]}}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return root


def runs(root: Path) -> list[str]:
    log = root / "runs.log"
    return log.read_text().split() if log.exists() else []


def test_a_missing_output_is_built_through_dvc_once_and_a_present_one_is_left(tmp_path):
    project = counting_project(tmp_path / "project")
    ensure_output("second", project / "second.txt", project)
    assert runs(project) == ["first", "second"]  # the stage and what it depends on, by DVC
    assert "second" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    ensure_output("second", project / "second.txt", project)
    assert runs(project) == ["first", "second"]  # present: DVC is not even asked
    (project / "second.txt").unlink()
    ensure_output("second", project / "second.txt", project)
    assert runs(project) == ["first", "second"]  # missing again: restored from DVC's cache, nothing rebuilt
    assert (project / "second.txt").read_text() == "second"
