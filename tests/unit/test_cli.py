"""The ``bertflow`` command line: ``--version``, and ``--params``/``--root`` before or after the stage's name."""

import json
import subprocess
import sys
from importlib import metadata

import pytest

from tasks.cli import build_parser, main
from tests.conftest import REPO, write_params


def test_version_prints_the_installed_package_version():
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "--version"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"bertflow {metadata.version('bertflow')}"


@pytest.mark.parametrize("argv", [
    ["--params", "x.yaml", "--root", "r", "ingest"],
    ["ingest", "--params", "x.yaml", "--root", "r"],
    ["--params", "x.yaml", "ingest", "--root", "r"],
    ["--params", "other.yaml", "--root", "elsewhere", "ingest", "--params", "x.yaml", "--root", "r"],  # after wins
])
def test_params_and_root_parse_the_same_before_or_after_the_stage(argv):
    args = build_parser().parse_args(argv)
    assert (args.command, args.params, args.root) == ("ingest", "x.yaml", "r")


def test_defaults_stand_when_neither_place_gives_them():
    args = build_parser().parse_args(["pretrain"])
    assert (args.params, args.root) == ("params.yaml", ".")
    assert build_parser().parse_args(["predict", "--root", "r", "-m", "models:/m/1", "a text"]).root == "r"
    assert build_parser().parse_args(["sync-dvc", "--root", "r", "--check"]).root == "r"


def test_a_stage_runs_alike_with_its_options_after_the_name(tiny):
    """The real ingest on the hand-written corpus, from a params file that is not params.yaml (so an option
    after the name that went unheard would end in 'params.yaml: not found', exit 2)."""
    params, folder = tiny
    write_params(folder, params, "x.yaml")
    assert main(["--params", str(folder / "x.yaml"), "--root", str(folder), "ingest"]) == 0
    before = untimed(json.loads((folder / "reports" / "ingest.json").read_text()))
    (folder / "reports" / "ingest.json").unlink()
    assert main(["ingest", "--params", str(folder / "x.yaml"), "--root", str(folder)]) == 0
    assert untimed(json.loads((folder / "reports" / "ingest.json").read_text())) == before
    assert before["labeled"]["rows"]  # a real ingest, not an empty report


def untimed(report):
    """A report without its timings (``seconds``, ``*_seconds``), which differ from run to run."""
    if isinstance(report, dict):
        return {k: untimed(v) for k, v in report.items() if not (k == "seconds" or k.endswith("_seconds"))}
    return [untimed(v) for v in report] if isinstance(report, list) else report
