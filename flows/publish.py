"""What a pipeline flow run tells Prefect besides its states: table artifacts and registry events.

- Table artifacts ``bertflow-stages`` (each stage: ran or skipped, seconds, where it ran) and
  ``bertflow-variants`` (the optimize stage's variants: accuracy, latency, throughput, size, and the
  registry version and alias each has), beside the flow's markdown summary.
- Events ``bertflow.model.registered`` (the register stage made a new version) and
  ``bertflow.model.promoted`` (that version became ``champion``), so that automations and deployment
  triggers react to the registry without polling it. Their resource is the model version
  (``mlflow.model-version.<name>.<version>``, labels ``mlflow.model.name``/``mlflow.model.version``/
  ``mlflow.model.aliases``), their payload the registry decision (model name, version, aliases, metric and
  value, model URI, the champion before), and Prefect relates them to the flow run that emitted them.

Reads: ``reports/register.json``, ``reports/optimize.json``. Writes: Prefect artifacts and events only.
Only the Prefect flow emits the events: ``dvc repro`` alone runs no Prefect, and MLflow's registry
(aliases ``champion``/``challenger``) is then the record to read.
"""

from __future__ import annotations

from typing import Any

REGISTERED = "bertflow.model.registered"
PROMOTED = "bertflow.model.promoted"
CHAMPION = "champion"


# ---------------------------------------------------------------- pure: what to publish


def model_events(registered: dict, before: dict) -> list[dict[str, Any]]:
    """The events the register stage's record calls for, as ``emit_event`` keyword arguments.

    ``registered`` is reports/register.json after the stage, ``before`` the same file before it ({} when
    there was none). None when the record names the version it named before (register found these very
    inputs registered and made nothing new); ``registered`` for a new version, and ``promoted`` beside it
    when the gate made it champion.
    """
    name, version = registered.get("model_name"), registered.get("version")
    if not name or not version or (name, version) == (before.get("model_name"), before.get("version")):
        return []
    aliases = list(registered.get("aliases", []))
    resource = {"prefect.resource.id": f"mlflow.model-version.{name}.{version}",
                "prefect.resource.name": f"{name} v{version}", "mlflow.model.name": name,
                "mlflow.model.version": str(version), "mlflow.model.aliases": ",".join(aliases)}
    related = [{"prefect.resource.id": f"mlflow.run.{registered['run_id']}", "prefect.resource.role": "mlflow-run"}] \
        if registered.get("run_id") else []
    payload = {"model_name": name, "version": str(version), "aliases": aliases,
               "decision": registered.get("decision"), "reason": registered.get("reason"),
               "metric": {"name": registered.get("metric"), "value": registered.get("value")},
               "model_uri": registered.get("model_uri"), "champion_before": registered.get("champion_before"),
               "variants": registered.get("variants", {}), "fast": registered.get("fast"),
               "run_id": registered.get("run_id"), "tracking_uri": registered.get("tracking_uri")}
    events = [{"event": REGISTERED, "resource": resource, "related": related, "payload": payload}]
    if registered.get("decision") == CHAMPION:
        events.append({"event": PROMOTED, "resource": resource, "related": related,
                       "payload": {**payload, "alias": CHAMPION}})
    return events


def stage_rows(outcomes: list[dict]) -> list[dict]:
    """One row per stage of the run: ran or skipped, seconds, and where (here, or the work pool's flow run)."""
    return [{"stage": o["stage"], "status": "ran" if o["ran"] else "skipped", "seconds": o["seconds"],
             "where": f"work pool (flow run {o['flow_run']})" if o.get("flow_run") else "this flow run"}
            for o in outcomes]


VARIANT_FIELDS = {"runtime": "runtime", "accuracy": "accuracy", "accuracy_drop": "accuracy drop",
                  "latency_p50_ms_b1": "p50 ms (batch 1)", "latency_p99_ms_b1": "p99 ms (batch 1)",
                  "throughput_b1": "texts/s (batch 1)", "throughput_b64": "texts/s (batch 64)",
                  "speedup_b1": "speed-up (batch 1)", "size_mb": "size MB"}


def variant_rows(optimize: dict, registered: dict) -> list[dict]:
    """One row per variant of reports/optimize.json, with the registry version register gave it (fp32: the
    classifier's own version) and the alias ``fast`` where it points; [] without variants."""
    versions = {"fp32": registered.get("version"), **registered.get("variants", {})}
    fast = (registered.get("fast") or {}).get("variant")
    rows = []
    for variant, figures in optimize.get("variants", {}).items():
        row = {"variant": variant, **{label: figures.get(key) for key, label in VARIANT_FIELDS.items()}}
        row["registered version"] = versions.get(variant)
        row["alias"] = "fast" if variant == fast else ""
        rows.append(row)
    return rows


# ---------------------------------------------------------------- edges: Prefect


def emit_model_events(registered: dict, before: dict) -> list[str]:
    """Emit :func:`model_events` (Prefect relates each to the current flow and task run); their names."""
    from prefect.events import emit_event

    events = model_events(registered, before)
    for event in events:
        emit_event(**event)
    return [event["event"] for event in events]


def create_tables(outcomes: list[dict], optimize: dict, registered: dict) -> None:
    """The stage table and, when the optimize stage has measured variants, the variants table."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(stage_rows(outcomes), key="bertflow-stages",
                          description="bertflow pipeline run: each stage ran or skipped, its seconds, where it ran")
    rows = variant_rows(optimize, registered)
    if rows:
        create_table_artifact(rows, key="bertflow-variants",
                              description="the optimize stage's variants of the classifier, measured, and their "
                                          "registry versions (reports/optimize.json, reports/register.json)")
