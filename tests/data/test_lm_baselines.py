"""The lm_baselines stage on the tiny profile's real corpus slice: every model scores the held-out split."""

import csv

import pytest

from bertflow.io import InputError
from bertflow.paths import Paths
from bertflow.timings import read_stage_report
from tests.conftest import REPO, copy_outputs


def test_lm_baselines_stage_reports_perplexities_and_a_loss_curve(tiny_run, tmp_path):
    from tasks.cli import run_stage

    root = copy_outputs(tiny_run, tmp_path / "project")
    figures = run_stage("lm_baselines", REPO / "params.tiny.yaml", root)
    assert read_stage_report(Paths(root), "lm_baselines") == figures  # results, and timings in reports/timing/
    tokens, bigram, lstm = figures["tokens"], figures["bigram"], figures["lstm"]
    assert tokens["train_sentences"] > 1000 and tokens["heldout_pieces"] > 1000
    assert 0 < bigram["discount"] < 1  # Ney's estimate (params.tiny.yaml leaves it null)
    # Context helps: the bigram beats the unigram on held-out text, and fits its own training text better still.
    assert bigram["train_perplexity"] < bigram["heldout_perplexity"] < figures["unigram"]["heldout_perplexity"]
    assert figures["unigram"]["heldout_perplexity"] < tokens["vocab_size"] + 1  # better than uniform
    assert lstm["steps"] == 40 and 1 < lstm["heldout_perplexity"] < float("inf")
    with open(root / "reports" / "lm_baselines" / "lstm.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [10, 20, 30, 40]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_an_empty_heldout_split_is_named(tiny_run, tmp_path):
    import pyarrow.parquet as pq

    from tasks.cli import run_stage

    root = copy_outputs(tiny_run, tmp_path / "project")
    heldout = root / "data" / "corpus" / "heldout.parquet"
    table = pq.read_table(heldout)
    pq.write_table(table.slice(0, 0), heldout)
    with pytest.raises(InputError, match=r"heldout\.parquet: no sentences with word pieces"):
        run_stage("lm_baselines", REPO / "params.tiny.yaml", root)
    assert not (root / "reports" / "lm_baselines").exists()


def test_with_the_lstm_off_the_stage_scores_the_counting_models_and_the_report_says_so(tiny_run, tmp_path):
    from tasks.cli import run_stage
    from tasks.report import language_models_section
    from tests.conftest import tiny_profile, write_params

    root = copy_outputs(tiny_run, tmp_path / "project")
    params = tiny_profile()
    params["lm_baselines"]["lstm"]["enabled"] = False
    figures = run_stage("lm_baselines", write_params(tmp_path, params), root)
    assert figures["lstm"] == {"enabled": False}
    assert figures["bigram"]["heldout_perplexity"] < figures["unigram"]["heldout_perplexity"]
    # no curve left from an earlier run, and a file so that git (`dvc exp save`) records the output folder
    assert (root / "reports" / "lm_baselines" / "lstm.csv").read_text().splitlines() == ["step,loss"]
    section = language_models_section({"lm_baselines": figures}, Paths(root))
    assert "LSTM: not trained in this run (lm_baselines.lstm.enabled: false)" in section
    assert "No curve" not in section
