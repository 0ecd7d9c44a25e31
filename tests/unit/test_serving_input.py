"""What the served model takes as texts and what it refuses, naming the item (serving.as_texts), and how
``bertflow predict`` reads its texts: pure, no model."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from bertflow.predict import PredictError, read_texts, shift_item
from bertflow.serving import BadInput, Coalescer, as_texts


@pytest.mark.parametrize("given, expected", [
    ("one", ["one"]), (["a", "b"], ["a", "b"]), (np.array(["a", "b"]), ["a", "b"]), (np.array("a"), ["a"]),
    (pd.Series(["a"]), ["a"]), (pd.DataFrame({"x": ["a"]}), ["a"]), (pd.DataFrame({"text": ["a"], "id": [1]}), ["a"]),
    ([], []),
])
def test_texts_in_every_accepted_shape(given, expected):
    assert list(as_texts(given)) == expected


@pytest.mark.parametrize("given, words", [
    ([1, None], "item 0 is int, not a text"), (["a", None], "item 1 is null"), ([float("nan")], "item 0 is null"),
    (np.array([["a", "b"]]), "nested lists"), ([["a"], "b"], "item 0 is a nested list"), (["a", ""], "item 1 is empty"),
    (["\t "], "item 0 is whitespace only"), ({"text": ["a"]}, "an object with keys ['text']"),
    (pd.DataFrame({"a": ["x"], "b": ["y"]}), "got columns ['a', 'b']"), ([True], "item 0 is bool"),
])
def test_what_is_not_a_text_is_refused_by_name(given, words):
    with pytest.raises(BadInput, match=None) as error:
        as_texts(given)
    assert words in str(error.value)


def test_predict_reads_arguments_files_and_stdin(tmp_path):
    assert read_texts(["a", "b"], None, "text") == ["a", "b"]
    assert read_texts([], None, "text", io.StringIO("a\n\n b\n")) == ["a", " b"]
    (tmp_path / "t.jsonl").write_text('{"t": "x"}\n{"t": "y"}\n')
    assert read_texts([], str(tmp_path / "t.jsonl"), "t") == ["x", "y"]
    (tmp_path / "t.tsv").write_text('t\tn\n"quoted" text\t1\n')
    assert read_texts([], str(tmp_path / "t.tsv"), "t") == ['"quoted" text']
    with pytest.raises(PredictError, match="not both"):
        read_texts(["a"], str(tmp_path / "t.tsv"), "t")
    (tmp_path / "t.parquet").write_text("")
    with pytest.raises(PredictError, match=r"unknown kind \.parquet"):
        read_texts([], str(tmp_path / "t.parquet"), "t")


def test_an_item_of_a_chunk_is_named_as_a_text_of_the_whole_input():
    assert shift_item("item 3 is empty: there is nothing to classify", 256) == (
        "text 260 is empty: there is nothing to classify")
    assert shift_item("expected a flat list", 256) == "expected a flat list"


class SlowModel:
    """A stand-in for LoadedModel: one row per text (its length), each run recorded and slow enough to overlap."""

    def __init__(self):
        self.runs: list[int] = []

    def frame(self, texts: list[str]) -> pd.DataFrame:
        import time

        if "boom" in texts:
            raise RuntimeError("boom")
        self.runs.append(len(texts))
        time.sleep(0.05)
        return pd.DataFrame({"label": texts, "length": [len(t) for t in texts]})


def test_concurrent_calls_share_runs_and_each_gets_its_own_rows():
    from concurrent.futures import ThreadPoolExecutor

    model = SlowModel()
    coalescer = Coalescer(model)
    requests = [[f"text {i}", "x" * i] for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(coalescer.frame, requests))
    for texts, frame in zip(requests, answers, strict=True):
        assert list(frame["label"]) == texts and list(frame.index) == [0, 1]
    assert sum(model.runs) == 24 and len(model.runs) < 12  # coalesced: fewer runs than calls
    assert list(coalescer.frame(["alone"])["label"]) == ["alone"] and model.runs[-1] == 1


def test_a_run_takes_at_most_coalesced_texts_unless_one_request_is_longer():
    from concurrent.futures import ThreadPoolExecutor

    from bertflow.serving import COALESCED_TEXTS

    model = SlowModel()
    requests = [[f"t{i}"] * (COALESCED_TEXTS // 2 + 1) for i in range(4)] + [["long"] * (COALESCED_TEXTS + 1)]
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(Coalescer(model).frame, requests))
    assert [list(frame["label"]) for frame in answers] == requests
    assert sorted(model.runs) == [COALESCED_TEXTS // 2 + 1] * 4 + [COALESCED_TEXTS + 1]


def test_an_error_reaches_the_caller_and_the_coalescer_goes_on():
    coalescer = Coalescer(SlowModel())
    with pytest.raises(RuntimeError, match="boom"):
        coalescer.frame(["boom"])
    assert list(coalescer.frame(["fine"])["label"]) == ["fine"]
