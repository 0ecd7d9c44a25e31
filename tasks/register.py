"""Stage register: track the pipeline run in MLflow and register the classifier behind a promotion gate.

Reads: ``artifacts/classifier`` (logged once, as the model), ``data/labeled/test.parquet`` (its
fingerprint), ``reports/*.json`` and curves (through tasks/tracking.py), ``dvc.lock`` and git.
Writes: to MLflow, a pipeline run with nested stage runs and one new version of the registered
model (a pyfunc from tasks/serving.py) with alias ``challenger``, and ``champion`` when it wins the
gate; the model card is the version's description. Locally, ``reports/register.json``.
Run: ``bertflow register``. When the registry does not answer it retries with back-off, then fails
naming the registry; everything trained stays on disk and re-running ``register`` alone registers it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tasks import tracking
from tasks.io import InputError, read_column, read_json
from tasks.params import Params, RegisterParams
from tasks.paths import Paths

log = logging.getLogger(__name__)
WHOLE_PARAMS = True  # run() takes every section: the pipeline run logs all of them
SERVING_CODE = Path(__file__).with_name("serving.py")
CHAMPION, CHALLENGER, FAST = "champion", "challenger", "fast"


class RegistryError(InputError):
    """The tracking server / model registry did not answer, or refused what was sent."""


# ---------------------------------------------------------------- the gate (pure)


@dataclass(frozen=True)
class Standing:
    """A version's figure on the configured metric and the test data it was measured on."""

    version: str
    value: float
    fingerprint: str


def promotion(new: Standing, champion: Standing | None, metric: str, min_delta: float) -> tuple[str, str]:
    """(decision, reason): champion when there is none or the new version beats it by ≥ min_delta."""
    if champion is None:
        return CHAMPION, "no champion yet"
    if champion.fingerprint != new.fingerprint:
        return CHALLENGER, (f"not compared: champion v{champion.version} was measured on other test data "
                            f"(fingerprint {champion.fingerprint[:12]} ≠ {new.fingerprint[:12]})")
    gain = round(new.value - champion.value, 9)
    if gain > 0 and gain >= min_delta:
        return CHAMPION, (f"{metric} {new.value:.5f} beats champion v{champion.version} ({champion.value:.5f}) "
                          f"by {gain:.5f} ≥ min_delta {min_delta}")
    return CHALLENGER, (f"{metric} {new.value:.5f} does not beat champion v{champion.version} "
                        f"({champion.value:.5f}) by more than 0 and at least min_delta {min_delta}")


@dataclass(frozen=True)
class Variant:
    """A registered form of the classifier (``fp32`` is the classifier itself) and its measured figures."""

    name: str
    version: str
    accuracy: float
    throughput_b1: float


def fast_choice(variants: list[Variant], champion_accuracy: float, max_drop: float) -> tuple[Variant | None, str]:
    """The quickest variant (batch-1 throughput) whose accuracy is at most ``max_drop`` below the champion's."""
    eligible = [v for v in variants if round(champion_accuracy - v.accuracy, 9) <= max_drop]
    if not eligible:
        return None, f"no variant within max_accuracy_drop {max_drop} of the champion's accuracy {champion_accuracy}"
    best = max(eligible, key=lambda v: v.throughput_b1)
    left_out = sorted(v.name for v in variants if v not in eligible)
    return best, (f"{best.name} v{best.version}: {best.throughput_b1:g} texts/s at batch 1, accuracy "
                  f"{best.accuracy:.5f} (champion {champion_accuracy:.5f}, max_accuracy_drop {max_drop})"
                  + (f"; over the budget: {', '.join(left_out)}" if left_out else ""))


def data_fingerprint(texts: list[str], labels: list[str]) -> str:
    """sha256 over the test rows' texts and label names: the same data wherever it lives."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(json.dumps([text, label], ensure_ascii=False).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- the model card (pure)


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
        f"- BERT L{model['num_hidden_layers']}/H{model['hidden_size']}/A{model['num_attention_heads']}, "
        f"{pretrain.get('parameters', '?')} parameters, vocabulary {reports.get('tokenizer', {}).get('vocab_size')}.",
        f"- Pretraining: {pretrain.get('steps', '?')} steps, {pretrain.get('tokens', '?')} tokens in "
        f"{pretrain.get('seconds', '?')} s; held-out MLM accuracy "
        f"{evaluation.get('pretrained_heldout', {}).get('mlm_accuracy', '?')}, NSP accuracy "
        f"{evaluation.get('pretrained_heldout', {}).get('nsp_accuracy', '?')}.",
        f"- Fine-tuning: best epoch {finetune.get('pretrained', {}).get('best_epoch', '?')} of "
        f"{params['finetune']['epochs']}, learning rate {params['finetune']['learning_rate']}.", "",
        "## Evaluation (test split)", "",
        "| model | accuracy | macro-F1 |", "|---|---|---|",
        f"| this model | {test.get('accuracy', '?')} | {test.get('macro_f1', '?')} |",
        *[f"| baseline: {key} | {value.get('accuracy')} | {value.get('macro_f1')} |"
          for key, value in baselines.items()], "",
        *variant_table(reports.get("optimize", {})),
        "## Lineage", "",
        *[f"- {key}: `{value}`" for key, value in sorted(lineage.items())], "",
    ]
    return "\n".join(lines)


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


# ---------------------------------------------------------------- talking to the registry (edge)


def retrying(settings: RegisterParams, what: str, uri: str, call):
    """Run ``call``; on failure wait backoff, 2·backoff, … for ``retries`` more tries, then fail clearly."""
    delay = settings.backoff_seconds
    for attempt in range(settings.retries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - any client error counts as "did not answer"
            if attempt == settings.retries:
                raise RegistryError(
                    f"MLflow registry at {redact(uri)} did not answer ({what}, {attempt + 1} attempts): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}. "
                    "The trained model is kept in artifacts/classifier; run `bertflow register` again "
                    "once the registry is back.") from exc
            log.warning("registry %s: %s failed (%s); retrying in %.1f s", redact(uri), what, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def redact(uri: str) -> str:
    """A URI without credentials, for messages and reports."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def configure_client(settings: RegisterParams, uri: str):
    """Our own retry loop replaces MLflow's long built-in HTTP retries; the URI is set explicitly."""
    import mlflow
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.timeout_seconds)))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def version_by_alias(client, name: str, alias: str):
    """The model version behind ``alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion_standing(client, name: str, metric: str) -> Standing | None:
    version = version_by_alias(client, name, CHAMPION)
    if version is None:
        return None
    return Standing(str(version.version), float(version.tags.get(f"metric.{metric}", "nan")),
                    version.tags.get("test_data_fingerprint", ""))


def log_model(run_id: str, folder: Path, example: list[str], name: str = "classifier",
              runtime: str = "torch") -> str:
    """A model folder as a pyfunc model (code from tasks/serving.py); returns the logged model's URI."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    labels = read_json(folder / "config.json")["id2label"]
    names = [labels[str(i)] for i in range(len(labels))]
    signature = ModelSignature(Schema([ColSpec("string")]),
                               Schema([ColSpec("string", "label"), *[ColSpec("double", f"score_{n}") for n in names]]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(SERVING_CODE), artifacts={"classifier": str(folder)},
            signature=signature, input_example=example, pip_requirements=requirements(runtime))
    return info.model_uri


def requirements(runtime: str = "torch") -> list[str]:
    """What a consumer installs: the ONNX variants need onnxruntime instead of torch and transformers."""
    from importlib.metadata import version

    engine = (["onnxruntime"] if runtime == "onnxruntime" else ["torch", "transformers"])
    return [f"{package}=={version(package).split('+')[0]}"
            for package in ["mlflow", *engine, "tokenizers", "numpy", "pandas"]]


def publish(client, settings: RegisterParams, params: Params, paths: Paths, figures: dict, uri: str) -> dict:
    """Run, model, version, aliases, tags and card; returns what reports/register.json records."""
    import mlflow

    timings = {}
    started = time.perf_counter()
    experiment = retrying(settings, "open the experiment", uri,
                          lambda: experiment_id(client, settings.experiment, tracking.embedded_artifacts(uri, paths)))
    lineage = tracking.lineage_tags(paths)
    run_id = tracking.log_pipeline_run(client, experiment, params.model_dump(mode="json"), paths, lineage)
    timings["tracking_seconds"] = round(time.perf_counter() - started, 2)
    try:
        started = time.perf_counter()
        model_uri = log_model(run_id, paths.classifier, figures["example"])
        timings["model_seconds"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        champion = champion_standing(client, settings.model_name, settings.metric)
        new = Standing("new", figures["test"][settings.metric], figures["fingerprint"])
        decision, reason = promotion(new, champion, settings.metric, settings.min_delta)
        version = mlflow.register_model(model_uri, settings.model_name, tags=version_tags(
            figures, new, champion, settings.metric, decision, reason, lineage, run_id)).version
        version = str(version)
        reports = {stage: tracking.read_report(paths, stage) for stage in tracking.STAGE_ORDER}
        card = model_card(settings.model_name, version, params.model_dump(mode="json"), reports,
                          {**lineage, "mlflow_run_id": run_id}, decision, reason)
        client.update_model_version(settings.model_name, version, description=card)
        client.set_registered_model_alias(settings.model_name, CHALLENGER, version)
        if decision == CHAMPION:
            client.set_registered_model_alias(settings.model_name, CHAMPION, version)
        variants = register_variants(client, settings, paths, figures, version, run_id, reports.get("optimize", {}))
        fast = fast_alias(client, settings, variants, decision, version, figures)
        tracking.log_report_artifacts(client, run_id, paths, card)
        client.set_tag(run_id, "registered_version", f"{settings.model_name}/{version}")
        client.set_terminated(run_id)
        timings["registry_seconds"] = round(time.perf_counter() - started, 2)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    aliases = [CHALLENGER] + ([CHAMPION] if decision == CHAMPION else []) + (
        [FAST] if fast["version"] == version else [])
    return {"model_name": settings.model_name, "version": version, "aliases": aliases, "decision": decision,
            "variants": {v.name: v.version for v in variants if v.name != "fp32"}, "fast": fast,
            "reason": reason, "metric": settings.metric, "value": new.value,
            "champion_before": None if champion is None else {"version": champion.version, "value": champion.value},
            "model_uri": f"models:/{settings.model_name}/{version}", "logged_model_uri": model_uri,
            "run_id": run_id, "experiment": settings.experiment, "tracking_uri": redact(uri),
            "test_data_fingerprint": figures["fingerprint"], "logging": timings}


def register_variants(client, settings: RegisterParams, paths: Paths, figures: dict, version: str, run_id: str,
                      optimize: dict) -> list[Variant]:
    """Every variant of reports/optimize.json as a version of the same registered model, tagged ``variant``.

    Returns them with the new fp32 version itself (variant ``fp32``), as the ``fast`` gate sees them.
    """
    import mlflow

    measured = optimize.get("variants", {})
    reference = measured.get("fp32", {})
    variants = [Variant("fp32", version, figures["test"]["accuracy"], reference.get("throughput_b1", 0.0))]
    for name, measures in measured.items():
        folder = paths.optimized / name
        if name == "fp32" or not folder.is_dir():
            continue
        uri = log_model(run_id, folder, figures["example"], f"variant-{name}", measures["runtime"])
        tags = metric_tags(measures)
        tags.update({"variant": name, "variant_of": version, "runtime": measures["runtime"],
                     "test_data_fingerprint": figures["fingerprint"], "mlflow_run_id": run_id})
        registered = str(mlflow.register_model(uri, settings.model_name, tags=tags).version)
        client.update_model_version(settings.model_name, registered, description=(
            f"Variant `{name}` ({measures['runtime']}) of {settings.model_name} v{version}: accuracy "
            f"{measures['accuracy']}, {measures['speedup_b1']}× the fp32 batch-1 throughput, {measures['size_mb']} MB. "
            f"Figures and the trade-off table: version {version}'s description."))
        variants.append(Variant(name, registered, measures["accuracy"], measures["throughput_b1"]))
    client.set_model_version_tag(settings.model_name, version, "variant", "fp32")
    return variants


def fast_alias(client, settings: RegisterParams, variants: list[Variant], decision: str, version: str,
               figures: dict) -> dict:
    """Point ``fast`` at the quickest form of a new champion within ``max_accuracy_drop``; a version that
    is not champion leaves ``fast`` where it is (on a form of the standing champion), or, when there is
    none yet (a champion registered before the optimize stage existed), points it at the champion."""
    if decision != CHAMPION:
        if version_by_alias(client, settings.model_name, FAST) is None:
            champion = version_by_alias(client, settings.model_name, CHAMPION)
            if champion is not None:
                reason = f"no fast alias yet: the champion v{champion.version} itself"
                client.set_registered_model_alias(settings.model_name, FAST, str(champion.version))
                return {"version": str(champion.version), "variant": "fp32", "reason": reason}
        return {"version": None, "variant": None, "reason": f"unchanged: v{version} is not the champion"}
    chosen, reason = fast_choice(variants, figures["test"]["accuracy"], settings.max_accuracy_drop)
    if chosen is None:  # cannot happen while fp32 (drop 0) is a candidate; kept for the rule's sake
        return {"version": None, "variant": None, "reason": reason}
    client.set_registered_model_alias(settings.model_name, FAST, chosen.version)
    client.set_model_version_tag(settings.model_name, chosen.version, "gate.fast", reason)
    return {"version": chosen.version, "variant": chosen.name, "reason": reason}


def metric_tags(figures: dict) -> dict[str, str]:
    """``metric.<name>`` tags for the numbers of a figures mapping (the gate reads them back)."""
    return {f"metric.{key}": str(value) for key, value in figures.items() if isinstance(value, int | float)}


def version_tags(figures: dict, new: Standing, champion: Standing | None, metric: str, decision: str, reason: str,
                 lineage: dict, run_id: str) -> dict[str, str]:
    tags = metric_tags(figures["test"])
    tags.update({"test_data_fingerprint": new.fingerprint, "gate.metric": metric, "gate.decision": decision,
                 "gate.reason": reason, "gate.new_value": str(new.value),
                 "gate.champion_value": "" if champion is None else str(champion.value),
                 "gate.champion_version": "" if champion is None else champion.version,
                 "mlflow_run_id": run_id, "git_commit": lineage.get("git_commit", "unknown")})
    return tags


# ---------------------------------------------------------------- the stage


def stage_inputs(paths: Paths) -> dict:
    """What the registration needs from earlier stages, checked before the registry is contacted."""
    optimized = tracking.read_report(paths, "optimize").get("variants", {})
    missing = [name for name in optimized if name != "fp32" and not (paths.optimized / name).is_dir()]
    if missing:
        raise InputError(f"{paths.optimized}: reports/optimize.json lists {', '.join(missing)} but they are not "
                         "there; run `bertflow optimize` again")
    if not (paths.classifier / "config.json").is_file():
        raise InputError(f"{paths.classifier}: no classifier; run `bertflow finetune` first")
    evaluation = paths.report("evaluate")
    if not evaluation.is_file():
        raise InputError(f"{evaluation}: missing; run `bertflow evaluate` first")
    test = paths.labeled / "test.parquet"
    names = read_json(paths.labeled / "labels.json")["labels"]
    texts = read_column(test, "text")
    labels = [names[i] for i in read_column(test, "label_id")]
    return {"test": {k: v for k, v in read_json(evaluation)["test"].items() if isinstance(v, int | float)},
            "fingerprint": data_fingerprint(texts, labels), "example": texts[:2]}


def run(params: Params, paths: Paths) -> dict:
    settings = params.register
    figures = stage_inputs(paths)
    uri = tracking.tracking_uri(settings.tracking_uri, paths)
    if uri.startswith("sqlite:"):
        (paths.root / tracking.EMBEDDED_DIR).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    client = configure_client(settings, uri)
    retrying(settings, "reach the tracking server", uri, lambda: client.search_experiments(max_results=1))
    try:
        result = publish(client, settings, params, paths, figures, uri)
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - one clear message, not a client traceback
        raise RegistryError(f"MLflow registry at {redact(uri)}: registration failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}. The trained model is kept in "
                            "artifacts/classifier; run `bertflow register` again.") from exc
    result["logging"]["total_seconds"] = round(time.perf_counter() - started, 2)
    log.info("registered %s v%s (%s): %s", result["model_name"], result["version"], result["decision"],
             result["reason"])
    return result
