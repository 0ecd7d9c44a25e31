"""Registry events and table artifacts of the Prefect flow (flows/publish.py), read back from a real Prefect
server: the events through its events filter, the tables through its artifacts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.flow.conftest import set_param

REGISTER_RECORD = {"model_name": "tiny", "version": "4", "aliases": ["challenger", "champion"],
                   "decision": "champion", "reason": "first", "metric": "accuracy", "value": 0.75,
                   "champion_before": {"version": "2", "value": 0.5}, "model_uri": "models:/tiny/4",
                   "variants": {"int8": "3"}, "fast": {"version": "3", "variant": "int8", "reason": "quickest"},
                   "run_id": "abc"}


def test_which_events_a_register_record_calls_for():
    from flows.publish import PROMOTED, REGISTERED, model_events

    champion = model_events(REGISTER_RECORD, {})
    assert [e["event"] for e in champion] == [REGISTERED, PROMOTED]
    assert champion[0]["resource"] == {
        "prefect.resource.id": "mlflow.model-version.tiny.4", "prefect.resource.name": "tiny v4",
        "mlflow.model.name": "tiny", "mlflow.model.version": "4", "mlflow.model.aliases": "challenger,champion"}
    assert champion[0]["payload"]["metric"] == {"name": "accuracy", "value": 0.75}
    assert champion[1]["payload"]["champion_before"] == {"version": "2", "value": 0.5}
    assert champion[0]["related"] == [{"prefect.resource.id": "mlflow.run.abc", "prefect.resource.role": "mlflow-run"}]
    challenger = {**REGISTER_RECORD, "decision": "challenger", "aliases": ["challenger"]}
    assert [e["event"] for e in model_events(challenger, {"model_name": "tiny", "version": "3"})] == [REGISTERED]
    assert model_events(REGISTER_RECORD, REGISTER_RECORD) == []  # register made nothing new
    assert model_events({}, {}) == []


def test_variant_rows_carry_registry_versions_and_the_fast_alias():
    from flows.publish import variant_rows

    optimize = {"variants": {"fp32": {"accuracy": 0.75, "runtime": "torch"},
                             "int8": {"accuracy": 0.74, "runtime": "torch_int8", "size_mb": 1.5}}}
    rows = variant_rows(optimize, REGISTER_RECORD)
    assert [(r["variant"], r["registered version"], r["alias"]) for r in rows] == [("fp32", "4", ""),
                                                                                  ("int8", "3", "fast")]
    assert rows[1]["size MB"] == 1.5 and rows[0]["size MB"] is None
    assert variant_rows({}, REGISTER_RECORD) == []


def flow_events(flow_run_id, expected: int, seconds: float = 60) -> list:
    """The bertflow.model.* events related to the flow run, from the server's events filter (the server
    persists events in batches: wait for ``expected`` of them)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    query = EventFilter(event=EventNameFilter(prefix=["bertflow.model."]),
                        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]))
    deadline = time.time() + seconds
    while True:
        with get_client(sync_client=True) as client:
            found = client.read_events(query, limit=50).events
        if len(found) >= expected or time.time() > deadline:
            return sorted(found, key=lambda e: e.event)
        time.sleep(1)


def table(flow_run_id, key: str) -> list[dict]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    (artifact,) = [a for a in artifacts if a.key == key]
    assert artifact.type == "table"
    return json.loads(artifact.data)


def test_a_new_champion_is_announced_and_the_run_leaves_its_tables(built, prefect_api, monkeypatch):
    """A new model name makes register's version the champion: the flow emits registered and promoted with
    the version, aliases and metric register recorded, related to its flow run; a run with nothing new emits
    nothing. The stage and variants tables are the run's artifacts."""
    from flows.pipeline import pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project: Path = built
    set_param(project, "register", "model_name", "tiny-events")  # register and report re-run
    first = pipeline(root=str(project), return_state=True)
    assert first.is_completed(), first.message
    assert [o["stage"] for o in first.result() if o["ran"]] == ["register", "report"]
    registered = json.loads((project / "reports" / "register.json").read_text())
    assert registered["decision"] == "champion"
    run_id = first.state_details.flow_run_id

    events = flow_events(run_id, 2)
    assert [e.event for e in events] == ["bertflow.model.promoted", "bertflow.model.registered"]
    for event in events:
        assert event.resource.id == f"mlflow.model-version.tiny-events.{registered['version']}"
        assert event.resource["mlflow.model.name"] == "tiny-events"
        assert event.payload["version"] == registered["version"]
        assert event.payload["aliases"] == registered["aliases"] and "champion" in registered["aliases"]
        assert event.payload["metric"] == {"name": "accuracy", "value": registered["value"]}
        assert event.payload["model_uri"] == f"models:/tiny-events/{registered['version']}"

    stages = table(run_id, "bertflow-stages")
    assert [(row["stage"], row["status"]) for row in stages][-3:] == [("optimize", "skipped"),
                                                                    ("register", "ran"), ("report", "ran")]
    variants = {row["variant"]: row for row in table(run_id, "bertflow-variants")}
    optimize = json.loads((project / "reports" / "optimize.json").read_text())
    assert set(variants) == set(optimize["variants"])
    assert variants["fp32"]["registered version"] == registered["version"]
    for name, version in registered["variants"].items():
        assert variants[name]["registered version"] == version
        assert variants[name]["accuracy"] == optimize["variants"][name]["accuracy"]
    assert [row["alias"] for row in variants.values()].count("fast") == (registered["fast"]["version"] is not None)

    second = pipeline(root=str(project), return_state=True)  # nothing changed: no stage runs, no events
    assert second.is_completed() and not any(o["ran"] for o in second.result())
    assert flow_events(second.state_details.flow_run_id, 1, seconds=10) == []
