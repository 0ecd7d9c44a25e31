"""Atomic outputs: a failure never leaves a half-written output, and never loses the previous one."""

import json

import pytest

from bertflow.io import atomic_dirs, write_json


def test_atomic_dirs_replace_targets_only_on_success(tmp_path):
    a, b = tmp_path / "out" / "a", tmp_path / "out" / "b"
    with atomic_dirs([a, b]) as (ta, tb):
        (ta / "x").write_text("1")
        (tb / "y").write_text("2")
        assert not a.exists()
    assert (a / "x").read_text() == "1" and (b / "y").read_text() == "2"
    with pytest.raises(RuntimeError):
        with atomic_dirs([a, b]) as (ta, tb):
            (ta / "x").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (a / "x").read_text() == "1" and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b"]
    with atomic_dirs([a]) as (ta,):
        (ta / "z").write_text("3")
    assert [p.name for p in a.iterdir()] == ["z"] and oct(a.stat().st_mode)[-3:] == "755"


def test_a_folder_left_empty_gets_a_note_and_a_written_one_does_not(tmp_path):
    """git keeps no empty folder, and the report folders are uncached DVC outputs that git holds: a folder a
    stage writes nothing into gets EMPTY.md, so `dvc exp save` finds it; a written one is left as written."""
    empty, written = tmp_path / "reports" / "optimize", tmp_path / "reports" / "evaluate"
    with atomic_dirs([empty, written]) as (_, tw):
        (tw / "x.csv").write_text("a\n")
    assert [p.name for p in empty.iterdir()] == ["EMPTY.md"] and [p.name for p in written.iterdir()] == ["x.csv"]
    note = (empty / "EMPTY.md").read_text()
    assert note.startswith("# reports/optimize: nothing written in this run") and "params.yaml" in note
    assert oct((empty / "EMPTY.md").stat().st_mode)[-3:] == "644"
    with atomic_dirs([empty]) as (te,):  # the same note each run: the folder's DVC hash does not change
        pass
    assert not te.exists() and (empty / "EMPTY.md").read_text() == note


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]
