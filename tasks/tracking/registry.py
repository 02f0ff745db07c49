"""The registry's rules: what a registered model name is bound to, and a fair promotion.

- Binding: the first version of a registered model fixes its task, as registered-model
  tags: the dataset identity, the input signature (shape, dtype) and the ordered class
  names. A later version for another task is refused before anything is logged, so no
  consumer of ``models:/<name>@champion`` ever gets a model for other data.
- Promotion: ``challenger`` always points at the newest version; ``champion`` moves to a
  candidate when there is none or when the candidate beats it by at least
  ``register.promote_margin`` (absolute test accuracy; a tie never moves it). The two
  accuracies must come from the same test data: when the champion was evaluated on
  another data version, it is evaluated again on the candidate's test set and that
  number is compared.
- Concurrency: binding checks and alias moves happen under a lock per registry and model
  name, as wide as the registry's clients reach (tasks/tracking/registry_lock.py).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, dataset_identity
from tasks.errors import RegistryBindingError
from tasks.tracking.registry_lock import registry_lock
from tasks.tracking.runs import test_metric
from tasks.workspace import Workspace

CHAMPION = "champion"
CHALLENGER = "challenger"
BINDING_KEYS = ("dataset", "input_shape", "input_dtype", "classes")


def binding_of(dataset: str, image_shape: list[int], class_names: list[str]) -> dict[str, str]:
    """The task a version serves, as registered-model tag values. The registered model
    takes raw pixels: float32 NHWC, any batch size."""
    return {
        "dataset": dataset,
        "input_shape": json.dumps([-1, *image_shape]),
        "input_dtype": "float32",
        "classes": json.dumps(list(class_names)),
    }


def bind_or_check(client: Any, model_name: str, wanted: dict[str, str]) -> None:
    """Create and bind ``model_name`` on first use; refuse a version for another task."""
    import mlflow

    try:
        bound = client.get_registered_model(model_name).tags
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model_name)
        bound = {}
    if not any(key in bound for key in BINDING_KEYS):
        for key, value in wanted.items():
            client.set_registered_model_tag(model_name, key, value)
        return
    differing = [key for key in BINDING_KEYS if bound.get(key) != wanted[key]]
    if differing:
        details = "; ".join(
            f"{key} {bound.get(key)} vs this run's {wanted[key]}" for key in differing
        )
        raise RegistryBindingError(
            f"registered model {model_name!r} serves another task ({details}): register this "
            f"model under another name (register.model_name=..., or `auto` for "
            f"<dataset>-<model>); nothing was registered"
        )


def check_dataset(client: Any, model_name: str, dataset: str) -> None:
    """Refuse, before any work, a run whose data another task's model name is bound to.

    The dataset is known from the config alone (the input shape and classes only once the
    data stage has read the data; register checks all of them again)."""
    import mlflow

    try:
        bound = client.get_registered_model(model_name).tags.get("dataset")
    except mlflow.exceptions.MlflowException:
        return  # no such model yet: this run will bind it
    if bound is not None and bound != dataset:
        raise RegistryBindingError(
            f"registered model {model_name!r} serves another task (dataset {bound} vs this "
            f"run's {dataset}): register this model under another name "
            f"(register.model_name=..., or `auto` for <dataset>-<model>); nothing was run"
        )


def should_promote(candidate: float, champion: float | None, margin: float) -> bool:
    """Promote when there is no champion, or the candidate is better by at least ``margin``.

    A tie never promotes, so rerunning identical params does not churn the alias.
    """
    if champion is None:
        return True
    improvement = candidate - champion
    return improvement > 0 and improvement >= margin


def alias_version(client: Any, model_name: str, alias: str) -> Any:
    import mlflow

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def recorded_accuracy(client: Any, version: Any) -> float | None:
    accuracy = version.tags.get("test_accuracy")
    if accuracy is None:  # registered by something else: fall back to its run's metric
        accuracy = test_metric(client.get_run(version.run_id).data.metrics, "accuracy")
    return None if accuracy is None else float(accuracy)


def champion_to_beat(
    client: Any,
    champion: Any,
    data_version: str | None,
    reevaluate: Callable[[str], float] | None,
) -> dict[str, Any]:
    """The champion's accuracy on the candidate's test data: its recorded one when it was
    evaluated on the same data version, else a fresh evaluation (``reevaluate(version)``)."""
    if champion is None:
        return {"version": None, "test_accuracy": None}
    recorded = recorded_accuracy(client, champion)
    record = {
        "version": str(champion.version),
        "test_accuracy": recorded,  # as registered, on its own test data
        "data_version": champion.tags.get("data_version"),
    }
    same_data = data_version is None or record["data_version"] == data_version
    if same_data or reevaluate is None:
        return record | {"compared_accuracy": recorded, "reevaluated": False}
    return record | {"compared_accuracy": reevaluate(record["version"]), "reevaluated": True}


def move_aliases(
    client: Any,
    model_name: str,
    version: str,
    test_accuracy: float,
    margin: float,
    data_version: str | None = None,
    reevaluate: Callable[[str], float] | None = None,
) -> dict[str, Any]:
    """Under the registry lock: challenger -> the newest version, champion -> by the rule.

    Holding the lock across read-compare-write keeps concurrent pipelines from both
    promoting against the same old champion; challenger never moves back to an older
    version when registrations finish out of order.
    """
    with registry_lock(model_name) as lock:
        champion = alias_version(client, model_name, CHAMPION)
        previous = champion_to_beat(client, champion, data_version, reevaluate)
        promoted = previous["version"] == version or should_promote(
            test_accuracy, previous.get("compared_accuracy"), margin
        )
        challenger = alias_version(client, model_name, CHALLENGER)
        if challenger is None or int(challenger.version) <= int(version):
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        if promoted:
            client.set_registered_model_alias(model_name, CHAMPION, version)
    return {
        "promoted": promoted,
        "champion_version": version if promoted else previous["version"],
        "previous_champion": previous,
        "lock": {"kind": lock.kind, "name": lock.name, "held": lock.held()},
    }


def version_of_run(client: Any, model_name: str, run_id: str) -> str | None:
    """The version already registered from ``run_id`` (a retried stage), or None."""
    versions = client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'")
    return str(min(int(v.version) for v in versions)) if versions else None


def load_version(model_name: str, version: str) -> Any:
    """A registered version's Keras model, loaded in Keras' safe mode (never unpickled)."""
    import mlflow

    from tasks.models.files import load_model_file

    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}", dst_path=scratch
        )
        [model_file] = Path(local).rglob("*.keras")
        return load_model_file(model_file)


def check_binding(cfg: PipelineConfig, ws: Workspace) -> None:
    """The registry check that needs nothing but the config: is register.model_name bound
    to this run's dataset? Called before the data stage and the flow do any work."""
    import mlflow

    from tasks.tracking.runs import configure

    configure(cfg, ws)
    dataset = dataset_identity(cfg.data.source, cfg.data.name, cfg.data.classes)
    check_dataset(mlflow.MlflowClient(), cfg.register.model_name, dataset)
