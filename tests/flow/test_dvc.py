"""The data stages under real DVC: first repro runs all, second none, and changes re-run just what depends on them."""

import json

import yaml

from tests.flow.conftest import (
    WHOLE_CHAIN_DVC,
    mlflow_client,
    registered_version,
    repro,
    set_param,
    set_params,
    sh,
    write_docs,
)

# Every optional part: the random-init ablation, both baselines, every variant, the LSTM, report logging.
EVERY_PART_OFF = [("finetune", "random_init_ablation", False), ("evaluate", "majority_baseline", False),
                  ("evaluate", "tfidf_baseline", False), ("optimize", "variants", []),
                  ("lm_baselines", "lstm.enabled", False), ("report", "log_to_mlflow", False)]


def test_repro_skips_and_reruns_exactly_what_changed(project):
    deps = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert deps[:2] == ["corpus", "train.tsv"] and "tasks/ingest.py" in deps
    assert repro(project) == ["ingest", "tokenizer", "pretrain_data"]
    assert repro(project) == []
    set_param(project, "tokenizer", "vocab_size", 160)
    assert repro(project) == ["tokenizer", "pretrain_data"]
    write_docs(project / "corpus", "b.txt", 100, 3)
    assert repro(project) == ["ingest", "tokenizer", "pretrain_data"]
    assert "up to date" in sh("dvc", "status", "pretrain_data", cwd=project).stdout
    for stage in ("ingest", "tokenizer", "pretrain_data"):
        assert (project / "reports" / f"{stage}.json").is_file()
    metrics = sh("dvc", "metrics", "show", cwd=project).stdout
    assert "train.instances" in metrics or "instances" in metrics


def test_stale_dvc_deps_are_refused(project):
    (project / "more").mkdir()
    write_docs(project / "more", "c.txt", 200, 3)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["corpus"]["sources"].append({"path": "more"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = sh("dvc", "repro", cwd=project, check=False)
    assert result.returncode != 0
    assert "stage ingest does not depend on dep more" in result.stdout + result.stderr
    assert not (project / "data" / "corpus").exists()
    sh("bertflow", "sync-dvc", cwd=project)
    assert repro(project) == ["ingest", "tokenizer", "pretrain_data"]


def test_whole_chain_under_dvc(built_project, built):
    """The session's project after `dvc repro report` from nothing, with every optional part on; then every
    optional part off (the ablation, the baselines, the variants, the LSTM, report logging): the chain
    re-runs exactly the stages those params belong to and their dependants, and still records."""
    project = built  # a copy of the session's project
    assert built_project[1] == WHOLE_CHAIN_DVC
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert repro(project, "report") == []
    metrics = sh("dvc", "metrics", "show", "--json", cwd=project).stdout
    assert "test.accuracy" in metrics or '"accuracy"' in metrics
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=project).stdout)["data"]
    assert set(plots) == {"pretraining loss", "held-out MLM and NSP", "fine-tuning dev accuracy",
                          "test confusion matrix", "reports/evaluate/confusion.png", "distillation loss",
                          "LSTM language model"}
    assert "mlm_accuracy" in json.dumps(plots["held-out MLM and NSP"])

    set_params(project, EVERY_PART_OFF)
    # attention reads only the classifier, which the ablation does not change: DVC rightly skips it
    assert repro(project, "report") == ["lm_baselines", "finetune", "evaluate", "optimize", "register", "report"]
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    reports = project / "reports"
    assert [p.name for p in (reports / "finetune").iterdir()] == ["pretrained.csv"]
    assert (reports / "lm_baselines" / "lstm.csv").read_text().splitlines() == ["step,loss"]  # no curve
    assert json.loads((reports / "evaluate.json").read_text())["baselines"] == {}
    assert json.loads((reports / "optimize.json").read_text())["variants"].keys() == {"fp32"}
    assert json.loads((reports / "report.json").read_text())["mlflow"]["logged"] is False
    assert (reports / "report.html").is_file()
    registered = json.loads((reports / "register.json").read_text())
    assert (project / "mlruns" / "mlflow.db").is_file()
    versions = mlflow_client(project).search_model_versions("name='tiny'")
    assert [v.version for v in versions if v.tags.get("variant") == "fp32"] == [int(registered["version"]),
                                                                                  registered_version(built_project[0])]
    assert registered["variants"] == {}  # no variant built, none registered

    # register has side effects: a params value it had before calls MLflow again (a new version), never
    # DVC's run-cache, which would only have put back the old reports/register.json
    for delta in (0.5, 0.0):
        set_param(project, "register", "min_delta", delta)
        out = sh("dvc", "repro", "register", cwd=project).stdout
        assert "Running stage 'register'" in out and "is cached" not in out, out
    again = json.loads((reports / "register.json").read_text())
    classifiers = sorted(int(v.version) for v in mlflow_client(project).search_model_versions(
        "name='tiny' and tags.variant='fp32'"))
    assert len(classifiers) == 4 and classifiers[1] == int(registered["version"])  # two more, one per run
    assert int(again["version"]) == classifiers[-1]
