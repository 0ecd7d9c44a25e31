"""Stage report: one self-contained HTML page that says what this run built, how good it is, and why.

Reads: every stage's ``reports/<stage>.json``; the curves ``reports/pretrain/*.csv``,
``reports/finetune/*.csv``, ``reports/lm_baselines/lstm.csv``; ``reports/evaluate/confusion.png``;
``reports/attention/*.png``; ``data/labeled/*.parquet`` (label counts); ``dvc.lock`` and git.
Writes: ``reports/report.html`` (CSS inline, every image a data: URI, no script, nothing fetched),
``reports/report.json`` (its sections and where it was logged), and — when the register stage has
recorded an MLflow run — the page as artifact ``report.html`` of that run. A stage whose report is
missing gets a line saying so; the page is still written. Run: ``bertflow report``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

from bertflow import stages, tracking
from bertflow.cards import STOPPED_BY, comparisons, family, interval_text, pretraining_verdict
from bertflow.io import read_column, write_text
from bertflow.pages import cards, esc, image, line_chart, number, page, table
from bertflow.params import Params
from bertflow.paths import Paths

log = logging.getLogger(__name__)
REPORTED = stages.before("report")  # every stage before this one, in order
SECTIONS = {"summary": "At a glance", "data": "Data", "tokenizer": "Tokenizer and pretraining data",
            "pretraining": "Pretraining", "finetuning": "Fine-tuning", "evaluation": "Evaluation",
            "language-models": "Language models", "attention": "Attention", "variants": "Variants",
            "registry": "Registry", "lineage": "Lineage"}
MLM_VS_LM = ("BERT's figure is a pseudo-perplexity, exp of its loss on the 15 % of pieces that were masked, "
             "each guessed from the words on both sides of it, whereas the bigram and LSTM figures score every "
             "piece from the pieces before it only, so the two numbers measure different tasks and neither "
             "ranks the models against the other.")
# ---------------------------------------------------------------- HTML pieces (pure)


def missing(stage: str) -> str:
    return f'<p class="note">No <code>reports/{esc(stage)}.json</code>: the {esc(stage)} stage has not run.</p>'


# ---------------------------------------------------------------- charts (matplotlib → PNG bytes)


def curve(path: Path, x: str, columns: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Columns of a metrics CSV (tracking's reader) as chart series; rows without the column left out."""
    rows = [{"step": float(step), **values} for step, values in tracking.read_curve(path)]
    series = {}
    for column in columns:
        points = [(row[x], row[column]) for row in rows if column in row and x in row]
        if points:
            series[column] = ([p[0] for p in points], [p[1] for p in points])
    return series


def chart_or_note(series: dict, xlabel: str, ylabel: str, title: str, source: str) -> str:
    if not series:
        return f'<p class="note">No curve in <code>{esc(source)}</code>.</p>'
    return image(line_chart(series, xlabel, ylabel, title), title, f"from {source}")


# ---------------------------------------------------------------- sections (pure given the reports)


def summary_section(reports: dict) -> str:
    test = reports.get("evaluate", {}).get("test", {})
    registered, lms = reports.get("register", {}), reports.get("lm_baselines", {})
    champion = (registered.get("version") if registered.get("decision") == "champion"
                else (registered.get("champion_before") or {}).get("version"))
    items = [("test accuracy", test.get("accuracy", "–")), ("test macro-F1", test.get("macro_f1", "–")),
             ("registry decision", registered.get("decision", "not registered")),
             ("version registered", registered.get("version", "–")),
             ("champion version", champion),
             ("fast variant", (registered.get("fast") or {}).get("variant") or "unchanged"),
             ("bigram held-out perplexity", lms.get("bigram", {}).get("heldout_perplexity", "–"))]
    reason, verdict = registered.get("reason"), pretraining_verdict(reports.get("evaluate", {}))
    return (cards(items) + (f'<p class="verdict"><strong>{esc(verdict)}</strong></p>' if verdict else "")
            + (f"<p>Gate: {esc(reason)}.</p>" if reason else ""))


def label_counts(paths: Paths, names: list[str]) -> list[list]:
    rows = []
    for split in ("train", "dev", "test"):
        path = paths.labeled / f"{split}.parquet"
        if path.is_file():
            counts = Counter(read_column(path, "label_id"))
            rows.append([split, sum(counts.values()), *[counts.get(i, 0) for i in range(len(names))]])
    return rows


def data_section(reports: dict, paths: Paths) -> str:
    ingest = reports.get("ingest")
    if not ingest:
        return missing("ingest")
    corpus = ingest.get("corpus", {})
    keys = ("documents", "sentences", "characters", "whitespace_tokens")
    rows = [[split, *[corpus.get(split, {}).get(key, "–") for key in keys]] for split in ("train", "heldout")]
    body = "<h3>Pretraining corpus</h3>" + table(["split", *keys], rows)
    dropped = corpus.get("dropped") or {}
    if dropped:
        body += f"<p>Dropped documents: {esc(', '.join(f'{k} {v}' for k, v in dropped.items()))}.</p>"
    names = ingest.get("labeled", {}).get("labels", [])
    body += "<h3>Labeled data (rows per label)</h3>" + table(["split", "rows", *names], label_counts(paths, names))
    return body


def tokenizer_section(reports: dict) -> str:
    tokenizer, data = reports.get("tokenizer"), reports.get("pretrain_data")
    if not tokenizer:
        return missing("tokenizer")
    body = table(["vocabulary", "held-out pieces", "pieces per word", "[UNK] rate", "training seconds"],
                 [[tokenizer.get("vocab_size"), tokenizer.get("heldout_tokens"),
                   tokenizer.get("heldout_pieces_per_word"), tokenizer.get("heldout_unk_rate"),
                   tokenizer.get("train_seconds")]])
    if not data:
        return body + missing("pretrain_data")
    rows = [[split, f.get("instances"), f.get("tokens"), f.get("nsp_positive_rate"), f.get("masked_rate"),
             " / ".join(str(f.get("masked_split", {}).get(k, "–")) for k in ("mask", "random", "self")),
             f.get("padding_fraction")] for split, f in ((s, data.get(s, {})) for s in ("train", "heldout"))]
    return body + "<h3>NSP pairs and masks</h3>" + table(
        ["split", "instances", "tokens", "IsNext share", "masked share", "[MASK] / random / kept", "padding"], rows)


def where(figures: dict) -> str:
    """Where a training stage ran (reports written before devices were recorded ran on the CPU)."""
    processes, device, threads = figures.get("processes", 1), figures.get("device", "cpu"), figures.get("threads", "?")
    if device != "cpu":
        return esc(device) if processes == 1 else f"{processes} GPUs, one process each"
    threads = f"{esc(threads)} thread{'' if threads == 1 else 's'}"
    return f"the CPU, {threads}" if processes == 1 else f"{processes} CPU processes, {threads} each"


def started_from(pretrain: dict) -> str:
    """Where pretraining started: random weights, or the pretrain.init checkpoint and the heads it lacked."""
    start = pretrain.get("start", {"init": "scratch"})
    if start.get("init", "scratch") == "scratch":
        return "from random weights"
    revision = f" at revision {esc(start['revision'][:12])}" if start.get("revision") else ""
    heads = ", ".join(start.get("new_heads", [])) or "none"
    return f"continued from pretrain.init <code>{esc(start['init'])}</code>{revision} (new heads: {esc(heads)})"


def bought(pretrain: dict) -> str:
    """The held-out MLM loss before the first step and at the end: what this pretraining bought."""
    before, after = pretrain.get("heldout_at_start", {}), pretrain.get("heldout", {})
    if "mlm_loss" not in before or "mlm_loss" not in after:
        return ""
    return (f" Held-out MLM loss {before['mlm_loss']:.3f} at step 0, {after['mlm_loss']:.3f} at step "
            f"{after.get('step', '?')} (accuracy {before.get('mlm_accuracy', 0):.3f} → "
            f"{after.get('mlm_accuracy', 0):.3f}).")


def pretraining_section(reports: dict, params: Params, paths: Paths) -> str:
    pretrain = reports.get("pretrain")
    if not pretrain:
        return missing("pretrain")
    model = params.pretrain.model
    held = reports.get("evaluate", {}).get("pretrained_heldout", pretrain.get("heldout", {}))
    body = cards([("parameters", pretrain.get("parameters", "–")), ("steps", pretrain.get("steps", "–")),
                  ("tokens/s", pretrain.get("tokens_per_second", "–")), *heldout_cards(held)])
    body += (f"<p>{esc(family(params.pretrain.architecture))} L{model.num_hidden_layers}/H{model.hidden_size}/"
             f"A{model.num_attention_heads}, {esc(objective_text(pretrain))}, "
             f"{started_from(pretrain)}, {number(pretrain.get('tokens', '–'))} tokens in "
             f"{number(pretrain.get('seconds', '–'))} s on {where(pretrain)} (bf16 {esc(pretrain.get('bf16', '?'))})."
             f"{bought(pretrain)}</p>")
    body += chart_or_note(curve(paths.reports / "pretrain" / "train.csv", "step",
                                ["loss", "mlm_loss", "nsp_loss", "rtd_loss"]),
                          "step", "loss", "pretraining loss", "reports/pretrain/train.csv")
    body += chart_or_note(curve(paths.reports / "pretrain" / "eval.csv", "step",
                                ["mlm_accuracy", "nsp_accuracy", "rtd_accuracy", "rtd_auc"]),
                          "step", "accuracy", "held-out accuracy", "reports/pretrain/eval.csv")
    return body


OBJECTIVES = {"mlm_nsp": "masked LM + next-sentence prediction", "mlm": "masked LM alone (no NSP)",
              "electra": "ELECTRA replaced-token detection"}


def objective_text(pretrain: dict) -> str:
    """The objective in words, with its inputs and, for ELECTRA, the generator's size."""
    objective = pretrain.get("objective", "mlm_nsp")
    text = f"objective {objective} ({OBJECTIVES.get(objective, objective)}) on {pretrain.get('inputs', 'pairs')}"
    generator = pretrain.get("generator")
    if generator:
        text += (f", generator H{generator['hidden_size']}/A{generator['num_attention_heads']}, "
                 f"RTD loss weight {pretrain.get('rtd_weight')}")
    return text


def heldout_cards(held: dict) -> list[tuple[str, object]]:
    """The held-out figures the objective has: MLM (ELECTRA: the generator's), NSP, replaced-token detection."""
    mlm = "held-out generator MLM accuracy" if held.get("mlm_of") == "generator" else "held-out MLM accuracy"
    found = [(mlm, held.get("mlm_accuracy", "–"))]
    if "rtd_accuracy" in held:
        found += [("held-out RTD accuracy", held["rtd_accuracy"]), ("held-out RTD ROC-AUC", held.get("rtd_auc", "–"))]
    else:
        found.append(("held-out NSP accuracy", held.get("nsp_accuracy", "–")))
    return found


def finetuning_section(reports: dict, paths: Paths) -> str:
    finetune = reports.get("finetune")
    if not finetune:
        return missing("finetune")
    rows = [[run, f.get("steps"), f.get("epochs_run"), STOPPED_BY.get(f.get("stopped_by"), "–"),
             f.get("best_step", "–"), f.get("best_epoch"), f.get("best_dev_accuracy"), f.get("seconds")]
            for run, f in finetune.items() if isinstance(f, dict) and "best_dev_accuracy" in f]
    body = table(["run", "steps", "epochs run", "ended by", "best step", "best epoch", "best dev accuracy",
                  "seconds"], rows)
    series = {}
    for run in ("pretrained", "random_init"):
        series.update({f"{run}: dev accuracy": s for s in
                       curve(paths.reports / "finetune" / f"{run}.csv", "epoch", ["dev_accuracy"]).values()})
    return body + chart_or_note(series, "epoch", "dev accuracy", "fine-tuning: from pretrained vs random weights",
                                "reports/finetune/*.csv")


def evaluation_section(reports: dict, paths: Paths) -> str:
    evaluation = reports.get("evaluate")
    if not evaluation:
        return missing("evaluate")
    test = evaluation.get("test", {})
    rows = [["bertflow classifier", test.get("accuracy"), test.get("macro_f1"), test.get("roc_auc", "–")]]
    names = {"random_init": "ablation: no pretraining (random init)", "majority": "baseline: majority class",
             "tfidf_logreg": "baseline: TF-IDF + logistic regression"}
    rows += [[names.get(key, key), f.get("accuracy"), f.get("macro_f1"), f.get("roc_auc", "–")]
             for key, f in evaluation.get("baselines", {}).items()]
    body = (f"<p>Test split: {number(evaluation.get('test_rows', '–'))} rows.</p>"
            + table(["model", "accuracy", "macro-F1", "ROC-AUC"], rows) + comparison_section(evaluation))
    body += "<h3>Per class</h3>" + table(
        ["label", "precision", "recall", "F1", "support"],
        [[name, f["precision"], f["recall"], f["f1"], f["support"]] for name, f in test.get("per_class", {}).items()])
    confusion = paths.reports / "evaluate" / "confusion.png"
    if confusion.is_file():
        body += image(confusion.read_bytes(), "confusion matrix", "test confusion matrix (rows: true label)")
    return body


def comparison_section(evaluation: dict) -> str:
    """The accuracy's bootstrap interval and one row per baseline's McNemar test (nothing for older reports)."""
    test = evaluation.get("test", {})
    interval = test.get("accuracy_interval")
    if not interval:
        return ""
    body = (f"<h3>Is the difference real?</h3><p>Test accuracy {esc(interval_text(test))}: the "
            f"{100 * interval['level']:.0f} % percentile bootstrap interval ({number(interval['resamples'])} "
            f"resamples of the test rows, seed {number(interval['seed'])}). McNemar's exact test looks only at "
            "the rows where the classifier and a baseline disagree.</p>")
    rows = [[pair, figures["b"], figures["c"], figures["p_value"], verdict]
            for pair, figures, verdict in comparisons(evaluation)]
    return body + (table(["accuracy: classifier vs baseline", "only the classifier right (b)",
                          "only the baseline right (c)", "exact McNemar p", "verdict"], rows) if rows else "")


def lstm_trained(lstm: dict) -> bool:
    """Whether lm_baselines trained its LSTM (a report from before the setting has no ``enabled``: it did)."""
    return lstm.get("enabled") is not False


def lstm_name(lstm: dict) -> str:
    if not lstm_trained(lstm):
        return "LSTM: not trained in this run (lm_baselines.lstm.enabled: false)"
    return f"LSTM ({number(lstm.get('steps', '?'))} steps, {number(lstm.get('train_seconds', '?'))} s)"


def language_models_section(reports: dict, paths: Paths) -> str:
    lms = reports.get("lm_baselines")
    if not lms:
        return missing("lm_baselines")
    tokens, bigram, lstm = lms.get("tokens", {}), lms.get("bigram", {}), lms.get("lstm", {})
    held = reports.get("evaluate", {}).get("pretrained_heldout", {})
    rows = [
        ["unigram (add-one)", "each piece, no context", lms.get("unigram", {}).get("heldout_perplexity", "–"), "–"],
        [f"bigram, interpolated Kneser-Ney (d = {bigram.get('discount', '?')})", "each piece from the one before",
         bigram.get("heldout_perplexity", "–"), bigram.get("train_perplexity", "–")],
        [lstm_name(lstm), "each piece from all before it", lstm.get("heldout_perplexity", "–"), "–"],
        ["BERT masked LM (pseudo-perplexity)", "masked pieces from both sides", held.get("mlm_perplexity", "–"), "–"],
    ]
    body = (f"<p>Held-out split: {number(tokens.get('heldout_sentences', '–'))} sentences, "
            f"{number(tokens.get('heldout_pieces', '–'))} word pieces of the run's tokenizer (vocabulary "
            f"{number(tokens.get('vocab_size', '–'))}); the left-to-right models also predict each sentence's end. "
            f"Trained on {number(tokens.get('train_sentences', '–'))} train-split sentences.</p>")
    body += table(["model", "predicts", "held-out perplexity", "train perplexity"], rows)
    body += f"<p>{esc(MLM_VS_LM)}</p>"
    if not lstm_trained(lstm):
        return body
    return body + chart_or_note(curve(paths.reports / "lm_baselines" / "lstm.csv", "step", ["loss"]), "step",
                                "loss (nats per piece)", "LSTM language model: training loss",
                                "reports/lm_baselines/lstm.csv")


def attention_section(reports: dict, paths: Paths) -> str:
    attention = reports.get("attention")
    if not attention:
        return missing("attention")
    body = ""
    for position, view in enumerate(attention.get("sentences", []), start=1):
        body += f"<h3>“{esc(view['text'])}” — from “{esc(view['token'])}”</h3>"
        layers = len(view.get("pretrained", {}).get("strongest_per_layer", []))
        body += table(["layer", *[label for label in attention.get("models", {}).values()]],
                      [[layer + 1, *[view.get(name, {}).get("strongest_per_layer", ["–"] * layers)[layer]
                                     for name in attention.get("models", {})]] for layer in range(layers)])
        body += '<p class="note">Most-attended piece per layer (heads averaged; itself, [CLS] and [SEP] left out).</p>'
        for name in ("pretrained", "classifier", "mean"):
            png = paths.reports / "attention" / f"{position}_{name}.png"
            if png.is_file():
                body += image(png.read_bytes(), f"attention {name}", f"reports/attention/{png.name}")
    return body


def variants_section(reports: dict) -> str:
    variants = reports.get("optimize", {}).get("variants", {})
    if not variants:
        return missing("optimize")
    keys = ("runtime", "accuracy", "macro_f1", "latency_p50_ms_b1", "latency_p99_ms_b1", "throughput_b1",
            "throughput_b64", "size_mb", "speedup_b1")
    return (f"<p>Batch-1 latency and throughput on {esc(reports['optimize'].get('threads', '?'))} threads, "
            "measured as served.</p>"
            + table(["variant", "runtime", "accuracy", "macro-F1", "p50 ms b1", "p99 ms b1", "texts/s b1",
                     "texts/s b64", "MB", "× fp32 b1"], [[name, *[f.get(k, "–") for k in keys]]
                                                        for name, f in variants.items()]))


def registry_section(reports: dict) -> str:
    registered = reports.get("register")
    if not registered:
        return missing("register")
    before = registered.get("champion_before") or {}
    fast = registered.get("fast") or {}
    rows = [["model", registered.get("model_uri", "–")], ["decision", registered.get("decision", "–")],
            ["reason", registered.get("reason", "–")], ["aliases", ", ".join(registered.get("aliases", [])) or "–"],
            ["champion before", f"v{before['version']} ({before.get('value')})" if before else "none"],
            ["fast", f"{fast.get('variant', '–')}: {fast.get('reason', '–')}"],
            ["variants", ", ".join(f"{k} v{v}" for k, v in (registered.get("variants") or {}).items()) or "–"]]
    return table(["", ""], rows)


def lineage_section(lineage: dict) -> str:
    outs = [[path, md5] for path, md5 in lineage["dvc"].items()]
    return (table(["", ""], [[key, value] for key, value in lineage["run"].items()])
            + "<h3>DVC: dvc.lock hashes of what this run read and built</h3>"
            + (table(["path", "md5"], outs) if outs else '<p class="note">No dvc.lock yet.</p>'))


# ---------------------------------------------------------------- lineage (reads git, dvc.lock, env)


def lineage(paths: Paths, registered: dict) -> dict[str, dict[str, str]]:
    """{"run": git, dvc.lock, MLflow and Prefect identities; "dvc": {path: md5} of the data and artifacts}."""
    found = {"git commit": tracking.git_revision(paths.root), "dvc.lock md5": tracking.lock_digest(paths.root),
             "MLflow run": registered.get("run_id", "not registered"),
             "MLflow experiment": registered.get("experiment", "–"),
             "MLflow tracking": registered.get("tracking_uri", "–"),
             "registered model": registered.get("model_uri", "–"),
             "Prefect flow run": tracking.prefect_flow_run_id() or "not run by the Prefect flow (dvc repro or by hand)"}
    api = os.environ.get("PREFECT_API_URL", "")
    if api and tracking.prefect_flow_run_id():
        found["Prefect flow run page"] = f"{api.removesuffix('/api')}/runs/flow-run/{tracking.prefect_flow_run_id()}"
    outputs = {path: md5 for path, md5 in tracking.dvc_lock_hashes(paths.root / "dvc.lock").items()
               if not path.startswith(("tasks/", "../"))}
    return {"run": found, "dvc": outputs}


# ---------------------------------------------------------------- edge


def build(params: Params, paths: Paths, reports: dict, found_lineage: dict) -> dict[str, str]:
    """Every section's HTML, in page order."""
    return {"summary": summary_section(reports), "data": data_section(reports, paths),
            "tokenizer": tokenizer_section(reports), "pretraining": pretraining_section(reports, params, paths),
            "finetuning": finetuning_section(reports, paths), "evaluation": evaluation_section(reports, paths),
            "language-models": language_models_section(reports, paths),
            "attention": attention_section(reports, paths), "variants": variants_section(reports),
            "registry": registry_section(reports), "lineage": lineage_section(found_lineage)}


def log_to_mlflow(params: Params, paths: Paths, registered: dict, page_path: Path) -> dict:
    """The page as artifact report.html of the run register recorded; retried, then a clear error."""
    from bertflow.registry import RegistryError, configure_client, redact, retrying

    if not params.report.log_to_mlflow:
        return {"logged": False, "why": "report.log_to_mlflow is false"}
    if not registered.get("run_id"):
        return {"logged": False, "why": "no MLflow run yet: the register stage has not run"}
    settings = params.register
    uri = tracking.tracking_uri(settings.tracking_uri, paths)
    client = configure_client(settings, uri)
    try:
        retrying(settings, "log the run report", uri, lambda: client.log_artifact(registered["run_id"], str(page_path)))
    except RegistryError as exc:
        raise RegistryError(f"MLflow registry at {redact(uri)} did not answer: {page_path} is written but not logged "
                            f"to run {registered['run_id']}; run `bertflow report` again once the registry is back "
                            f"({str(exc.__cause__ or exc).splitlines()[0][:200]})") from exc
    return {"logged": True, "run_id": registered["run_id"], "artifact_uri": f"runs:/{registered['run_id']}/report.html"}


def run(params: Params, paths: Paths) -> dict:
    started = time.perf_counter()
    reports = {stage: tracking.read_report(paths, stage) for stage in REPORTED}
    reports = {stage: report for stage, report in reports.items() if report}
    registered = reports.get("register", {})
    sections = build(params, paths, reports, lineage(paths, registered))
    title = f"bertflow run report: {registered.get('model_name', 'unregistered model')}"
    subtitle = (f"{time.strftime('%Y-%m-%d %H:%M %Z')} · version {registered.get('version', '–')} · "
                f"stages reported: {', '.join(reports) or 'none'}")
    target = paths.reports / "report.html"
    write_text(target, page(title, subtitle, sections, SECTIONS))
    figures = {"sections": list(sections), "missing": [stage for stage in REPORTED if stage not in reports],
               "images": sum(body.count("<img ") for body in sections.values()),
               "bytes": target.stat().st_size}
    figures["mlflow"] = log_to_mlflow(params, paths, registered, target)
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return figures
