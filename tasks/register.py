"""Stage register: track the pipeline run in MLflow and register the classifier behind a promotion gate.

Reads: ``artifacts/classifier`` (logged once, as the model), ``data/labeled/test.parquet`` (its
fingerprint), ``reports/*.json`` and curves (through bertflow/tracking.py), ``dvc.lock``, ``dvc.yaml``,
``params.yaml`` and git.
Writes: to MLflow, a pipeline run with nested stage runs and one new version of the registered
model (a pyfunc from bertflow/serving.py, whose logged model carries the test figures on the test data
set: ``model_id``) with alias ``challenger``, and ``champion`` when it wins the gate (a new champion's
variants are registered just before it, a losing version gets none); the model card is the version's
description; the run's artifacts ``restore/`` (dvc.lock, params.yaml and the uncached reports as they
stand while register runs) are what ``bertflow restore`` brings back. Locally, ``reports/register.json``
(and the seconds spent logging in ``reports/timing/register.json``).
Run: ``bertflow register``. When the registry does not answer, MLflow's client retries with its back-off
(``register.retries``, ``backoff_seconds``, ``timeout_seconds``), then register fails naming the registry;
everything trained stays on disk and re-running ``register`` alone registers it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from bertflow import serving, tracking
from bertflow.cards import model_card
from bertflow.io import InputError, read_column, read_json
from bertflow.params import Params, RegisterParams
from bertflow.paths import Paths
from bertflow.registry import (
    CHALLENGER,
    CHAMPION,
    FAST,
    RegistryError,
    Standing,
    Variant,
    champion_standing,
    configure_client,
    experiment_id,
    fast_choice,
    promotion,
    redact,
    redact_text,
    retrying,
    version_by_alias,
)

log = logging.getLogger(__name__)
SERVING_CODE = Path(serving.__file__)  # the pyfunc logged with each version: it needs no bertflow


# ---------------------------------------------------------------- the gate (pure)


def registration_key(paths: Paths, settings: RegisterParams, fingerprint: str) -> str:
    """sha256 of what one registration is made of: the classifier's files, the variants and their figures,
    the test data, the gate's settings and the register report as it stands before the run. The same
    inputs give the same key, so a registration cut short (killed after MLflow made the version, or
    after it finished but before it wrote reports/register.json) is finished on the next run instead of
    made again; a run after a finished one (whose report then names its version) registers anew."""
    digest = hashlib.sha256()
    files = [p for p in sorted(paths.classifier.rglob("*")) if p.is_file()]
    for path in files + [paths.report("optimize"), paths.report("register")]:
        if path.is_file():
            digest.update(path.relative_to(paths.root).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    gate = settings.model_dump(include={"model_name", "experiment", "metric", "min_delta", "max_accuracy_drop"})
    digest.update(json.dumps([fingerprint, gate], sort_keys=True).encode())
    return digest.hexdigest()


def data_fingerprint(texts: list[str], labels: list[str]) -> str:
    """sha256 over the test rows' texts and label names: the same data wherever it lives."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(json.dumps([text, label], ensure_ascii=False).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- talking to the registry (edge)


def log_model(run_id: str, folder: Path, example: list[str], name: str = "classifier",
              runtime: str = "torch"):
    """A model folder as a pyfunc model (code from bertflow/serving.py); returns MLflow's ``ModelInfo`` (its
    ``model_uri`` and ``model_id``)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    labels = read_json(folder / "config.json")["id2label"]
    names = [labels[str(i)] for i in range(len(labels))]
    # No input schema: MLflow would enforce "string" by casting (1 and null became the texts "1" and "None");
    # serving.as_texts checks every item itself and refuses what is not a text with a 400 naming it.
    signature = ModelSignature(None,
                               Schema([ColSpec("string", "label"), *[ColSpec("double", f"score_{n}") for n in names],
                                       ColSpec("boolean", "truncated")]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(SERVING_CODE), artifacts={"classifier": str(folder)},
            signature=signature, input_example=example, pip_requirements=requirements(runtime))
    return info


def requirements(runtime: str = "torch") -> list[str]:
    """What a consumer installs: the ONNX variants need onnxruntime instead of torch and transformers."""
    from importlib.metadata import version

    engine = (["onnxruntime"] if runtime == "onnxruntime" else ["torch", "transformers"])
    return [f"{package}=={version(package).split('+')[0]}"
            for package in ["mlflow", *engine, "tokenizers", "numpy", "pandas"]]


KEY_TAG, DONE_TAG = "registration_key", "registration_complete"  # version tags that make registration idempotent


def earlier_registration(client, name: str, key: str):
    """The version an earlier run registered from the same inputs (complete or cut short), or None."""
    found = client.search_model_versions(f"name='{name}' and tags.{KEY_TAG}='{key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def publish(client, settings: RegisterParams, params: Params, paths: Paths, figures: dict, uri: str) -> dict:
    """Run, model, version, aliases, tags and card; returns what reports/register.json records.

    Idempotent: a version registered from the same inputs is not made again. A complete one gives back
    what its run recorded; one cut short (the process killed after MLflow made it) is finished.
    """
    key = registration_key(paths, settings, figures["fingerprint"])
    earlier = earlier_registration(client, settings.model_name, key)
    if earlier is not None and earlier.tags.get(DONE_TAG):
        log.info("%s v%s was registered from these very inputs: nothing new", settings.model_name, earlier.version)
        return json.loads(earlier.tags[DONE_TAG])
    timings = {}
    started = time.perf_counter()
    if earlier is None:
        experiment = retrying(settings, "open the experiment", uri, lambda: experiment_id(
            client, settings.experiment, tracking.embedded_artifacts(uri, paths)))
        lineage = tracking.lineage_tags(paths)
        run_id = tracking.log_pipeline_run(client, experiment, params.model_dump(mode="json"), paths, lineage)
    else:
        log.info("finishing %s v%s, whose registration was cut short", settings.model_name, earlier.version)
        run_id, lineage = earlier.tags["mlflow_run_id"], tracking.lineage_tags(paths)
    timings["tracking_seconds"] = round(time.perf_counter() - started, 2)
    try:
        started = time.perf_counter()
        # what `bertflow restore` brings back: dvc.lock, params.yaml and the uncached reports as they stand now
        # (also on finishing a cut-short registration, whose inputs are the same). dvc.yaml declares none of
        # them as register's deps: DVC writes dvc.lock itself (a dep would be a cycle, changed by every stage
        # run), and the lock's entries of the stages before register already pin those reports and each stage's
        # own params; declaring params.yaml whole would register anew on a change to schedule or report.
        tracking.log_restore_data(client, run_id, paths)
        if earlier is None:
            model_uri = log_model(run_id, paths.classifier, figures["example"]).model_uri
            # the test figures, on the test data set, belong to the logged model: MLflow's Models view ranks by them
            tracking.log_model_metrics(client, run_id, model_id(model_uri),
                                       tracking.read_report(paths, "evaluate").get("test", {}), paths)
            champion = champion_standing(client, settings.model_name, settings.metric)
        else:
            model_uri, champion = earlier.source, standing_before(earlier)
        timings["model_seconds"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        new = Standing("new", figures["test"][settings.metric], figures["fingerprint"])
        decision, reason = promotion(new, champion, settings.metric, settings.min_delta)
        reports = {stage: tracking.read_report(paths, stage) for stage in tracking.STAGE_ORDER}
        # a new champion's variants are registered before it, so the newest version (and `latest`) is always a
        # classifier; a version that loses the gate gets no variants (nobody would serve them)
        variants = register_variants(client, settings, paths, figures, key, run_id, reports.get("optimize", {})) \
            if decision == CHAMPION else []
        if earlier is None:
            tags = version_tags(figures, new, champion, settings.metric, decision, reason, lineage, run_id)
            version = str(mlflow_register(model_uri, settings.model_name, {**tags, KEY_TAG: key}))
        else:
            version = str(earlier.version)
        variants = link_variants(client, settings.model_name, version, variants, figures,
                                 reports.get("optimize", {}).get("variants", {}))
        card = model_card(settings.model_name, version, params.model_dump(mode="json"), reports,
                          {**lineage, "mlflow_run_id": run_id}, decision, reason)
        client.update_model_version(settings.model_name, version, description=card)
        describe_registered_model(client, settings.model_name)
        client.set_registered_model_alias(settings.model_name, CHALLENGER, version)
        if decision == CHAMPION:
            client.set_registered_model_alias(settings.model_name, CHAMPION, version)
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
    result = {"model_name": settings.model_name, "version": version, "aliases": aliases, "decision": decision,
              "variants": {v.name: v.version for v in variants if v.name != "fp32"}, "fast": fast,
              "reason": reason, "metric": settings.metric, "value": new.value,
              "champion_before": None if champion is None else {"version": champion.version, "value": champion.value},
              "model_uri": f"models:/{settings.model_name}/{version}", "logged_model_uri": model_uri,
              "model_id": model_id(model_uri),
              "run_id": run_id, "experiment": settings.experiment, "tracking_uri": redact(uri),
              "test_data_fingerprint": figures["fingerprint"], "logging": timings}
    client.set_model_version_tag(settings.model_name, version, DONE_TAG, json.dumps(result))  # the last write
    return result


def model_id(model_uri: str) -> str | None:
    """The logged model's id in MLflow 3 (``models:/m-...``), None for an older run's URI (``runs:/...``)."""
    return model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None


def mlflow_register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags).version


def standing_before(version) -> Standing | None:
    """The champion a version was gated against, as its tags recorded it."""
    tags = version.tags
    if not tags.get("gate.champion_version"):
        return None
    return Standing(tags["gate.champion_version"], float(tags["gate.champion_value"]),
                    tags.get("test_data_fingerprint", ""))


VARIANT_KEY_TAG = "variant_registration_key"  # a variant's link to the registration it belongs to (resume)


def register_variants(client, settings: RegisterParams, paths: Paths, figures: dict, key: str, run_id: str,
                      optimize: dict) -> list[Variant]:
    """Every variant of reports/optimize.json as a version of the same registered model (an alias such as
    ``fast`` can only name a version of its own model), tagged ``variant`` and ``runtime``, registered before
    the classifier they belong to; ``link_variants`` then tags them ``variant_of`` and adds the classifier.
    Variants a run cut short had registered (the same ``key``) are taken, not registered again."""
    import mlflow

    measured = optimize.get("variants", {})
    done = {v.tags.get("variant"): str(v.version) for v in client.search_model_versions(
        f"name='{settings.model_name}' and tags.{VARIANT_KEY_TAG}='{key}'")}
    variants = []
    for name, measures in measured.items():
        folder = paths.optimized / name
        if name == "fp32" or not folder.is_dir():
            continue
        if name not in done:
            uri = log_model(run_id, folder, figures["example"], f"variant-{name}", measures["runtime"]).model_uri
            tags = metric_tags(measures)
            tags.update({"variant": name, "runtime": measures["runtime"], VARIANT_KEY_TAG: key,
                         "test_data_fingerprint": figures["fingerprint"], "mlflow_run_id": run_id})
            done[name] = str(mlflow.register_model(uri, settings.model_name, tags=tags).version)
        variants.append(Variant(name, done[name], measures["accuracy"], measures["throughput_b1"]))
    return variants


def link_variants(client, name: str, version: str, variants: list[Variant], figures: dict,
                  optimize: dict) -> list[Variant]:
    """Tag each variant ``variant_of`` = the classifier's version and describe it (``optimize``: the figures of
    reports/optimize.json's ``variants``); returns them with the classifier itself (variant ``fp32``), as the
    ``fast`` gate sees them."""
    for variant in variants:
        client.set_model_version_tag(name, variant.version, "variant_of", version)
        measures = optimize.get(variant.name, {})
        client.update_model_version(name, variant.version, description=(
            f"Variant `{variant.name}` ({measures.get('runtime', '?')}) of {name} v{version}: accuracy "
            f"{variant.accuracy}, {measures.get('speedup_b1', '?')}× the fp32 batch-1 throughput, "
            f"{measures.get('size_mb', '?')} MB. Figures and the trade-off table: version {version}'s description."))
    client.set_model_version_tag(name, version, "variant", "fp32")
    fp32 = optimize.get("fp32", {})
    return [Variant("fp32", version, figures["test"]["accuracy"], fp32.get("throughput_b1", 0.0)), *variants]


def describe_registered_model(client, name: str) -> None:
    """The registered model's description and tags: what it is and how to find a version's forms."""
    client.update_registered_model(name, description=(
        "BERT text classifier built by bertflow (corpus → WordPiece → MLM+NSP pretraining → fine-tuning → "
        "evaluation). Aliases: `champion` (the best on the test data), `challenger` (the newest), `fast` (the "
        "quickest form of the champion within register.max_accuracy_drop). Classifier versions carry tag "
        "`variant=fp32`; the champion's other forms (int8, ONNX, student, pruned) are the versions tagged "
        "`variant_of=<its version>`, registered just before it, so `latest` is always a classifier. Each "
        "version's description is its model card."))
    for key, value in {"built_by": "bertflow", "task": "text-classification",
                       "find_variants": "tags.variant_of = '<version>'"}.items():
        client.set_registered_model_tag(name, key, value)


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
                            f"{redact_text(str(exc).splitlines()[0])[:300] if str(exc) else ''}. The trained model "
                            "is kept in artifacts/classifier; run `bertflow register` again.") from exc
    result["logging"]["total_seconds"] = round(time.perf_counter() - started, 2)
    log.info("registered %s v%s (%s): %s", result["model_name"], result["version"], result["decision"],
             result["reason"])
    return result
