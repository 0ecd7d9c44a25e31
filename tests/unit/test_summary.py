"""bertflow/summary.py: the three lines after make run's stage table, from known reports."""

import json
from pathlib import Path

from bertflow.summary import closing_lines, closing_text

EVALUATION = {
    "test": {"accuracy": 0.8125, "macro_f1": 0.81,
             "accuracy_interval": {"lower": 0.78, "upper": 0.845, "level": 0.95, "resamples": 1000, "seed": 0}},
    "baselines": {"random_init": {"accuracy": 0.7925}, "majority": {"predicts": "1", "accuracy": 0.5},
                  "tfidf_logreg": {"accuracy": 0.8}},
    "pretraining_gain": {"classifier_accuracy": 0.81, "other_accuracy": 0.79, "gain": 0.02,
                         "gain_interval": {"lower": 0.005, "upper": 0.035, "level": 0.95},
                         "p_value": 0.012, "better": "classifier", "classifier_accuracy_by_seed": [0.8125, 0.8075]},
}
REGISTERED = {"decision": "champion", "model_uri": "models:/bertflow-sst2/7",
              "reason": "accuracy 0.81250 beats champion v6 (0.80000) by 0.01250 ≥ min_delta 0.0"}
PAGE = Path("/project/reports/report.html")


def test_the_three_lines_from_known_reports():
    assert closing_lines(EVALUATION, REGISTERED, PAGE, True) == [
        "Test accuracy 81.2 % [78.0, 84.5] beside random init (no pretraining) 79.2 %, majority class 50.0 %, "
        "TF-IDF + logistic regression 80.0 %. Pretraining paid: +2.0 points over the same fine-tuning from random "
        "weights (81.0 % vs 79.0 %, 95 % interval [+0.5, +3.5], exact paired p = 0.012, 2 seeds).",
        "Registry: models:/bertflow-sst2/7 registered as champion "
        "(accuracy 0.81250 beats champion v6 (0.80000) by 0.01250 ≥ min_delta 0.0)",
        "Report: /project/reports/report.html",
    ]


def test_what_the_lines_say_when_something_is_missing_or_was_skipped():
    no_ablation = {"test": {"accuracy": 0.5}, "baselines": {"majority": {"accuracy": 0.5}}}
    before_the_test = {"test": {"accuracy": 0.77}, "baselines": {"random_init": {"accuracy": 0.8}}}
    assert closing_lines(no_ablation, {}, PAGE, False, register_ran=True) == [
        "Test accuracy 50.0 % beside majority class 50.0 %. Whether pretraining paid was not measured "
        "(finetune.random_init_ablation is off).",
        "Registry: nothing registered (reports/register.json is missing)",
        "Report: not written (/project/reports/report.html is missing)",
    ]
    test, registry, _ = closing_lines(before_the_test, REGISTERED, PAGE, True, register_ran=False)
    assert test.endswith("Pretraining: -3.0 points over the same fine-tuning from random weights "
                         "(no paired test in this report).")
    assert registry.endswith("; decided by an earlier run: register had nothing new")
    assert closing_lines({}, {}, PAGE, False)[0] == (
        "Test: no figures (reports/evaluate.json is missing or has no test accuracy)")


def test_closing_text_reads_the_project_reports(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "evaluate.json").write_text(json.dumps(EVALUATION))
    (reports / "register.json").write_text(json.dumps(REGISTERED))
    (reports / "report.html").write_text("<html></html>")
    outcomes = [{"stage": "evaluate", "ran": True, "seconds": 1.0}, {"stage": "register", "ran": False, "seconds": 0}]
    lines = closing_text(tmp_path, outcomes).splitlines()
    assert lines == closing_lines(EVALUATION, REGISTERED, (reports / "report.html").resolve(), True,
                                  register_ran=False)
    assert lines[2] == f"Report: {(reports / 'report.html').resolve()}"
