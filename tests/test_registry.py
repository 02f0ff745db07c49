"""Registry consistency: one version per run on retries, serialized alias moves, retry policy."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import mlflow
import psycopg
import pytest
import requests
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from tasks.config import ConfigError
from tasks.errors import DataUnavailableError
from tasks.images import register as images_register
from tasks.modality import ServedModel
from tasks.stages import register
from tasks.tracking import registry, runs, store


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield mlflow.MlflowClient()
    mlflow.set_registry_uri("")
    # set_registry_uri also exports MLFLOW_REGISTRY_URI (for subprocesses) and "" does not
    # clear it: later tests' pipelines would register into this test's store.
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def new_version(client, name: str, accuracy: float) -> str:
    """A registered version with its test accuracy tag, as the register stage leaves it."""
    experiment = client.get_experiment_by_name("versions") or client.get_experiment(
        client.create_experiment("versions")
    )
    run = client.create_run(experiment.experiment_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, "file:///dev/null", run_id=run.info.run_id)
    client.set_model_version_tag(name, version.version, "test_accuracy", repr(accuracy))
    return str(version.version)


def test_concurrent_alias_moves_leave_the_best_champion_and_newest_challenger(client):
    accuracies = [0.3, 0.9, 0.5, 0.8, 0.9, 0.1]
    versions = [new_version(client, "m", acc) for acc in accuracies]
    barrier = threading.Barrier(len(versions))

    def promote(version: str, accuracy: float) -> None:
        barrier.wait()  # all compare-and-move at once
        registry.move_aliases(mlflow.MlflowClient(), "m", version, accuracy, 0.0)

    threads = [
        threading.Thread(target=promote, args=pair)
        for pair in zip(versions, accuracies, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    champion = client.get_model_version_by_alias("m", "champion")
    assert float(champion.tags["test_accuracy"]) == max(accuracies)
    assert str(client.get_model_version_by_alias("m", "challenger").version) == versions[-1]


def test_a_retried_registration_reuses_the_runs_version(client, tmp_path, monkeypatch, tiny_cfg):
    from tasks.workspace import Workspace

    ws = Workspace(tmp_path)
    ws.prepared.mkdir(parents=True)
    meta = {"image_shape": [32, 32, 3], "class_names": [str(i) for i in range(10)]}
    (ws.prepared / "meta.json").write_text(json.dumps(meta))
    experiment = client.create_experiment("retry")
    run_id = client.create_run(experiment).info.run_id
    calls = []

    def served_model(cfg, ws, scratch):  # what the name binds to; the model is faked below
        return ServedModel(
            code=Path("unused"),
            artifacts={},
            model_config={},
            input_example=None,
            binding=registry.binding_of("synthetic", meta["image_shape"], meta["class_names"]),
        )

    def fake_log_model(served, cfg):
        calls.append(1)
        if not client.search_registered_models(f"name = '{cfg.register.model_name}'"):
            client.create_registered_model(cfg.register.model_name)
        name = cfg.register.model_name
        return str(client.create_model_version(name, "file:///dev/null", run_id=run_id).version)

    monkeypatch.setattr(register, "log_model", fake_log_model)
    monkeypatch.setattr(images_register, "served_model", served_model)
    ws.preprocessed.mkdir(parents=True)
    kept = register.keep_data(ws)  # not in a DVC project: hashed, kept nowhere
    assert kept.storage.startswith("none")
    assert set(kept.hashes) == {"data/prepared", "data/preprocess"}
    first = register.log_and_register(tiny_cfg, ws, run_id, 0.5, kept)
    again = register.log_and_register(tiny_cfg, ws, run_id, 0.5, kept)
    assert len(calls) == 1
    assert first["version"] == again["version"] == "1"
    assert again["promoted"] is True  # it is still the champion it made itself
    assert len(client.search_model_versions(f"name = '{tiny_cfg.register.model_name}'")) == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("slow"), True),
        (requests.ConnectionError("no route"), True),
        (DataUnavailableError("offline"), True),
        (mlflow.exceptions.MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
        (mlflow.exceptions.MlflowException("bad", error_code=INVALID_PARAMETER_VALUE), False),
        (ConfigError("unknown config key 'train.epoch'"), False),
        (FileNotFoundError("data/prepared/meta.json"), False),
        (ValueError("a bug"), False),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.errors.AdminShutdown("terminating connection (restart)"), True),
        (psycopg.errors.CannotConnectNow("the database system is starting up"), True),
        (psycopg.errors.InvalidPassword("password authentication failed"), False),
        (psycopg.errors.UndefinedTable("relation does not exist"), False),
    ],
)
def test_transient_errors_are_retried_and_others_are_not(error, expected):
    assert store.is_transient(error) is expected


def test_an_unreachable_prefect_server_fails_the_lock_naming_it_and_is_transient(monkeypatch):
    from tasks.errors import RegistryLockError
    from tasks.tracking.registry_lock import registry_lock
    from tests.helpers.operate import free_port

    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    monkeypatch.setenv("PREFECT_API_URL", url)
    expected = "could not reach the Prefect server"
    with pytest.raises(RegistryLockError, match=expected) as failed, registry_lock("m"):
        pass
    assert url in str(failed.value)
    assert store.is_transient(failed.value), "the stage retry may find it back"


def test_a_wrapped_connection_error_counts_as_transient():
    try:
        try:
            raise requests.ConnectionError("Max retries exceeded")
        except requests.ConnectionError:
            raise mlflow.exceptions.MlflowException("API request failed") from None
    except mlflow.exceptions.MlflowException as wrapped:
        # `from None` hides the context from tracebacks; it is still the cause here.
        assert store.is_transient(wrapped)


def test_a_transient_failure_keeps_the_run_open_for_the_retry(tiny_cfg, workspace):
    with (
        pytest.raises(ConnectionRefusedError),
        runs.stage_run(tiny_cfg, workspace, "train") as first,
    ):
        raise ConnectionRefusedError("tracking server restarting")
    assert mlflow.MlflowClient().get_run(first).info.status == "RUNNING"
    with runs.stage_run(tiny_cfg, workspace, "train") as retried:
        pass
    assert retried == first
