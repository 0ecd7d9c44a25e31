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
CHAMPION, CHALLENGER = "champion", "challenger"


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
        "```", "Needs only mlflow, torch and transformers.", "",
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
        "## Lineage", "",
        *[f"- {key}: `{value}`" for key, value in sorted(lineage.items())], "",
    ]
    return "\n".join(lines)


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


def champion_standing(client, name: str, metric: str) -> Standing | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return Standing(str(version.version), float(version.tags.get(f"metric.{metric}", "nan")),
                    version.tags.get("test_data_fingerprint", ""))


def log_model(run_id: str, paths: Paths, example: list[str]) -> str:
    """The classifier folder as a pyfunc model (code from tasks/serving.py); returns the model URI."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    labels = read_json(paths.classifier / "config.json")["id2label"]
    names = [labels[str(i)] for i in range(len(labels))]
    signature = ModelSignature(Schema([ColSpec("string")]),
                               Schema([ColSpec("string", "label"), *[ColSpec("double", f"score_{n}") for n in names]]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="classifier", python_model=str(SERVING_CODE), artifacts={"classifier": str(paths.classifier)},
            signature=signature, input_example=example, pip_requirements=requirements())
    return info.model_uri


def requirements() -> list[str]:
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"torch=={version('torch').split('+')[0]}",
            f"transformers=={version('transformers')}", f"pandas=={version('pandas')}"]


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
        model_uri = log_model(run_id, paths, figures["example"])
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
        tracking.log_report_artifacts(client, run_id, paths, card)
        client.set_tag(run_id, "registered_version", f"{settings.model_name}/{version}")
        client.set_terminated(run_id)
        timings["registry_seconds"] = round(time.perf_counter() - started, 2)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    aliases = [CHALLENGER] + ([CHAMPION] if decision == CHAMPION else [])
    return {"model_name": settings.model_name, "version": version, "aliases": aliases, "decision": decision,
            "reason": reason, "metric": settings.metric, "value": new.value,
            "champion_before": None if champion is None else {"version": champion.version, "value": champion.value},
            "model_uri": f"models:/{settings.model_name}/{version}", "logged_model_uri": model_uri,
            "run_id": run_id, "experiment": settings.experiment, "tracking_uri": redact(uri),
            "test_data_fingerprint": figures["fingerprint"], "logging": timings}


def version_tags(figures: dict, new: Standing, champion: Standing | None, metric: str, decision: str, reason: str,
                 lineage: dict, run_id: str) -> dict[str, str]:
    tags = {f"metric.{key}": str(value) for key, value in figures["test"].items()
            if isinstance(value, int | float)}
    tags.update({"test_data_fingerprint": new.fingerprint, "gate.metric": metric, "gate.decision": decision,
                 "gate.reason": reason, "gate.new_value": str(new.value),
                 "gate.champion_value": "" if champion is None else str(champion.value),
                 "gate.champion_version": "" if champion is None else champion.version,
                 "mlflow_run_id": run_id, "git_commit": lineage.get("git_commit", "unknown")})
    return tags


# ---------------------------------------------------------------- the stage


def stage_inputs(paths: Paths) -> dict:
    """What the registration needs from earlier stages, checked before the registry is contacted."""
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
