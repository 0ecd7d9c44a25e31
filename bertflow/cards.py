"""The model cards: the Markdown description of a registered version (figures, variants, lineage), and the
``README.md`` of the classifier folder in Hugging Face's conventions (YAML metadata, then how to use it).

Pure: reports and params in, Markdown out. ``comparisons`` is also the run report's reading of
evaluate's McNemar tests, so the card and the page say the same thing.
"""

from __future__ import annotations

from bertflow.architectures import ARCHITECTURES, MODEL_TYPES

BASELINES = {"random_init": "random init (no pretraining)", "majority": "majority class",
             "tfidf_logreg": "TF-IDF + logistic regression"}


def model_card(name: str, version: str | None, params: dict, reports: dict, lineage: dict, decision: str,
               reason: str) -> str:
    ingest, evaluation = reports.get("ingest", {}), reports.get("evaluate", {})
    pretrain, finetune = reports.get("pretrain", {}), reports.get("finetune", {})
    test, baselines = evaluation.get("test", {}), evaluation.get("baselines", {})
    model = params["pretrain"]["model"]
    rows = ingest.get("labeled", {}).get("rows", {})
    corpus = ingest.get("corpus", {})
    lines = [
        f"# {name}" + (f" v{version}" if version else ""), "",
        "BERT sequence classifier built by bertflow: corpus → WordPiece tokenizer → MLM+NSP pretraining → "
        "fine-tuning → evaluation → registration.", "",
        f"**Gate:** {decision} ({reason}).", "",
        "## Use", "",
        "```python", "import mlflow",
        f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        'model.predict(["a charming and often affecting journey"])  # label + score_<label> per class',
        f'fast = mlflow.pyfunc.load_model("models:/{name}@fast")  # quickest variant within the accuracy budget',
        "```", "Needs mlflow and tokenizers, plus torch and transformers (PyTorch variants) or onnxruntime (ONNX).", "",
        "## Data", "",
        f"- Pretraining corpus: {_get(corpus, 'train', 'documents')} documents, {_get(corpus, 'train', 'sentences')} "
        f"sentences (train); {_get(corpus, 'heldout', 'documents')} documents held out.",
        f"- Labeled rows: train {rows.get('train', '?')}, dev {rows.get('dev', '?')}, test {rows.get('test', '?')}; "
        f"labels {evaluation and list(test.get('per_class', {}))}.",
        f"- Sources: {', '.join(s['path'] for s in params['ingest']['corpus']['sources'])}; labeled "
        f"{params['ingest']['labeled']['train']}.", "",
        "## Model and training", "",
        f"- {family(params['pretrain'].get('architecture', 'bert'))} L{model['num_hidden_layers']}/"
        f"H{model['hidden_size']}/A{model['num_attention_heads']}, {pretrain.get('parameters', '?')} parameters, "
        f"vocabulary {reports.get('tokenizer', {}).get('vocab_size')}.",
        f"- Pretraining ({pretrain.get('objective', 'mlm_nsp')}): {pretrain.get('steps', '?')} steps, "
        f"{pretrain.get('tokens', '?')} tokens in {pretrain.get('seconds', '?')} s; "
        f"{heldout_text(evaluation.get('pretrained_heldout', {}))}.",
        f"- Fine-tuning: {finetune_text(finetune.get('pretrained', {}), params['finetune'])}.", "",
        "## Evaluation (test split)", "",
        "| model | accuracy | macro-F1 |", "|---|---|---|",
        f"| this model | {test.get('accuracy', '?')} | {test.get('macro_f1', '?')} |",
        *[f"| baseline: {key} | {value.get('accuracy')} | {value.get('macro_f1')} |"
          for key, value in baselines.items()], "",
        *comparison_lines(evaluation),
        *variant_table(reports.get("optimize", {})),
        "## Lineage", "",
        *[f"- {key}: `{value}`" for key, value in sorted(lineage.items())], "",
    ]
    return "\n".join(lines)


STOPPED_BY = {"budget": "the budget ran out", "early_stopping": "early stopping",
              "max_epochs": "the epoch cap"}


def limits_text(settings: dict) -> str:
    """What may end fine-tuning: "30 min budget, 20-epoch cap" (params.finetune)."""
    budget = (f"{settings['budget_minutes']:g} min budget" if settings.get("budget_minutes")
              else f"{settings['max_steps']} steps budget" if settings.get("max_steps") else "no budget")
    return f"{budget}, {settings['epochs']}-epoch cap"


def finetune_text(run: dict, settings: dict) -> str:
    """One fine-tuning run (reports/finetune.json's ``pretrained``) in words: its steps, what ended it, where the
    kept (best dev) weights are from, and the limits it ran under."""
    if "best_dev_accuracy" not in run:
        return f"not run ({limits_text(settings)})"
    ended = STOPPED_BY.get(run.get("stopped_by"), "?")
    best = f"step {run['best_step']}, epoch {run['best_epoch']}" if "best_step" in run else f"epoch {run['best_epoch']}"
    return (f"{run['steps']} steps in {run.get('epochs_run', '?')} epochs, ended by {ended}; weights kept from the "
            f"best dev evaluation ({best}: dev accuracy {run['best_dev_accuracy']}); {limits_text(settings)}, "
            f"learning rate {settings['learning_rate']}")


def interval_text(test: dict) -> str:
    """The accuracy in percent with its bootstrap interval when evaluate recorded one: "80.2 % [77.5, 82.8]"."""
    interval = test.get("accuracy_interval")
    accuracy = f"{100 * test['accuracy']:.1f} %"
    return f"{accuracy} [{100 * interval['lower']:.1f}, {100 * interval['upper']:.1f}]" if interval else accuracy


def comparisons(evaluation: dict) -> list[tuple[str, dict, str]]:
    """(classifier vs baseline accuracies, McNemar figures, verdict) for each baseline evaluate tested."""
    test = evaluation.get("test", {})
    if "accuracy" not in test:
        return []
    found = []
    for key, figures in evaluation.get("baselines", {}).items():
        if "mcnemar" in figures:
            name = BASELINES.get(key, key)
            verdict = {"classifier": "classifier better", "baseline": f"{name} better"}.get(
                figures["mcnemar"]["better"], "no difference at 5 %")
            found.append((f"classifier {interval_text(test)} vs {name} {100 * figures['accuracy']:.1f} %",
                          figures["mcnemar"], verdict))
    return found


def heldout_text(held: dict) -> str:
    """The pretrained model's held-out figures in words, those its objective has."""
    mlm = "generator MLM accuracy" if held.get("mlm_of") == "generator" else "MLM accuracy"
    text = f"held-out {mlm} {held.get('mlm_accuracy', '?')}"
    if "rtd_accuracy" in held:
        return text + f", replaced-token detection accuracy {held['rtd_accuracy']} (ROC-AUC {held.get('rtd_auc')})"
    if "nsp_accuracy" in held or "objective" not in held:
        return text + f", NSP accuracy {held.get('nsp_accuracy', '?')}"
    return text


def family(architecture: str) -> str:
    """How the card names an architecture (``pretrain.architecture`` or a config's ``model_type``):
    "post-LayerNorm BERT", "pre-LayerNorm BERT (MegatronBert)"."""
    return ARCHITECTURES.get(MODEL_TYPES.get(architecture, architecture), architecture)


def points(value: float) -> str:
    return f"{100 * value:+.1f} points"


def pretraining_verdict(evaluation: dict) -> str | None:
    """One sentence: did pretraining pay in this run, and by how much (None without the random-init ablation)."""
    gain = evaluation.get("pretraining_gain")
    if not gain:
        return None
    interval, seeds = gain["gain_interval"], len(gain["classifier_accuracy_by_seed"])
    opening = {"classifier": "Pretraining paid", "baseline": "Pretraining cost accuracy"}.get(
        gain["better"], "Pretraining did not pay measurably")
    bounds = f"[{100 * interval['lower']:+.1f}, {100 * interval['upper']:+.1f}]"
    sentence = (f"{opening}: {points(gain['gain'])} over the same fine-tuning from random weights "
                f"({100 * gain['classifier_accuracy']:.1f} % vs {100 * gain['other_accuracy']:.1f} %, "
                f"{100 * interval['level']:.0f} % interval {bounds}, "
                f"exact paired p = {gain['p_value']:.2g}, {seeds} seed{'s' if seeds > 1 else ''})")
    tfidf = gain.get("tfidf_logreg")
    if tfidf:
        sentence += (f"; against TF-IDF + logistic regression ({100 * tfidf['other_accuracy']:.1f} %) "
                     f"{points(tfidf['gain'])}, p = {tfidf['p_value']:.2g}")
    return sentence + "."


def comparison_lines(evaluation: dict) -> list[str]:
    """The card's lines on the interval and the McNemar tests (none for a report from before them)."""
    test = evaluation.get("test", {})
    interval = test.get("accuracy_interval")
    if not interval:
        return []
    lines = [f"Test accuracy {interval_text(test)}: {100 * interval['level']:.0f} % percentile bootstrap interval, "
             f"{interval['resamples']:,} resamples of the {evaluation.get('test_rows', '?')} test rows.", ""]
    verdict = pretraining_verdict(evaluation)
    if verdict:
        lines += [verdict, ""]
    found = comparisons(evaluation)
    if found:
        lines += ["Exact McNemar tests on the rows where classifier and baseline disagree (b: only the classifier "
                  "right, c: only the baseline right):", ""]
        lines += [f"- {pair}: McNemar p = {figures['p_value']:.2g} (b = {figures['b']}, c = {figures['c']}), "
                  f"{verdict}." for pair, figures, verdict in found]
    return [*lines, ""]


def variant_table(optimize: dict) -> list[str]:
    """The trade-off table of reports/optimize.json (empty when the stage did not run)."""
    variants = optimize.get("variants", {})
    if not variants:
        return []
    lines = ["## Variants (test split, batch-1 latency and throughput on "
             f"{optimize.get('threads', '?')} threads)", "",
             "| variant | runtime | accuracy | macro-F1 | p50 ms b1 | p99 ms b1 | texts/s b1 | texts/s b64 | "
             "MB | speed-up b1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in variants.items():
        lines.append(f"| {name} | {f['runtime']} | {f['accuracy']} | {f['macro_f1']} | {f['latency_p50_ms_b1']} | "
                     f"{f['latency_p99_ms_b1']} | {f['throughput_b1']} | {f['throughput_b64']} | {f['size_mb']} | "
                     f"{f['speedup_b1']}× |")
    return [*lines, ""]


def _get(mapping: dict, *keys: str):
    for key in keys:
        mapping = mapping.get(key, {}) if isinstance(mapping, dict) else {}
    return mapping if mapping != {} else "?"


def folder_card(labels: list[str], run: dict, settings: dict, config: dict) -> str:
    """``artifacts/classifier/README.md``: the Hugging Face model card of the folder as finetune leaves it (its
    test figures come later, in the registered version's card)."""
    front = ["---", "library_name: transformers", "pipeline_tag: text-classification", "tags:", "- bert",
             "- bertflow", "- text-classification", "---", ""]
    return "\n".join(front + [
        "# bertflow classifier", "",
        f"A {family(config.get('model_type', 'bert'))} sequence classifier (L{config['num_hidden_layers']}/"
        f"H{config['hidden_size']}/"
        f"A{config['num_attention_heads']}, {config['max_position_embeddings']} positions, vocabulary "
        f"{config['vocab_size']}) fine-tuned by `bertflow finetune`. Labels: {', '.join(labels)}.", "",
        "## Use", "",
        "```python", "from transformers import pipeline",
        'classify = pipeline("text-classification", model="artifacts/classifier", truncation=True)',
        'classify("a charming and often affecting journey")', "```", "",
        f"Texts longer than {config['max_position_embeddings']} word pieces are cut there (`truncation=True`; the "
        "tokenizer's `model_max_length` is the model's length). The registered form of this model "
        "(`bertflow predict`, `mlflow models serve`) says which texts were cut.", "",
        "## Training", "",
        f"- {finetune_text(run, settings)}.",
        f"- Batch {settings['batch_size']}, sequence length {settings['max_seq_length']}, "
        f"weight decay {settings['weight_decay']}, warm-up {settings['warmup_fraction']}, seed {settings['seed']}.", "",
        "Test-set figures, baselines and McNemar tests: the description of the registered version "
        "(`bertflow register`), and `reports/evaluate.json`.", ""])
