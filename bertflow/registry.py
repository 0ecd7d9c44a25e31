"""The MLflow registry client and the promotion gate.

Pure parts: the gate (``promotion``), the choice of alias ``fast`` (``fast_choice``) and MLflow's HTTP retry
settings from params (``http_settings``). Edge parts: a client whose requests MLflow retries with its own
back-off and timeout, one error naming the registry when they are spent, alias look-ups. Writes only
through the client it is given.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from bertflow.io import InputError
from bertflow.params import RegisterParams

CHAMPION, CHALLENGER, FAST = "champion", "challenger", "fast"


class RegistryError(InputError):
    """The tracking server / model registry did not answer, or refused what was sent."""


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


def retrying(settings: RegisterParams, what: str, uri: str, call):
    """Run ``call`` once: a tracking server's requests are retried by MLflow itself, as ``configure_client`` set
    it up (``register.retries``, ``backoff_seconds``, ``timeout_seconds``); what still fails becomes one error
    naming the registry."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - any client error counts as "did not answer"
        retries = settings.retries
        tries = f", {retries} retr{'y' if retries == 1 else 'ies'}" if uri.startswith(("http:", "https:")) else ""
        raise RegistryError(
            f"MLflow registry at {redact(uri)} did not answer ({what}{tries}): "
            f"{type(exc).__name__}: {redact_text(str(exc).splitlines()[0])[:300] if str(exc) else ''}. "
            "The trained model is kept in artifacts/classifier; run `bertflow register` again "
            "once the registry is back.") from exc


def redact(uri: str) -> str:
    """A URI without credentials, for messages and reports."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def redact_text(text: str) -> str:
    """A client's message without the credentials of any URL in it (MLflow's errors quote the request's URL)."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


HTTP_RETRIES, HTTP_BACKOFF, HTTP_TIMEOUT = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                                           "MLFLOW_HTTP_REQUEST_TIMEOUT")
RETRY_LIMITS = {HTTP_RETRIES: 10, HTTP_BACKOFF: 120}  # MLflow refuses more (its _..._LIMIT variables)


def http_settings(settings: RegisterParams) -> dict[str, str]:
    """MLflow's HTTP retry settings from ``register``: ``retries`` further tries, MLflow's exponential back-off
    of factor ``backoff_seconds`` (whole seconds, as MLflow reads it), ``timeout_seconds`` per request."""
    wanted = {HTTP_RETRIES: settings.retries, HTTP_BACKOFF: math.ceil(settings.backoff_seconds),
              HTTP_TIMEOUT: math.ceil(settings.timeout_seconds)}
    return {key: str(min(value, RETRY_LIMITS.get(key, value))) for key, value in wanted.items()}


def configure_client(settings: RegisterParams, uri: str):
    """A client for ``uri`` whose HTTP requests MLflow retries as ``register`` says; a variable the environment
    already sets (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ...) wins, as for any MLflow client."""
    import mlflow
    from mlflow import MlflowClient

    for key, value in http_settings(settings).items():
        os.environ.setdefault(key, value)
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
