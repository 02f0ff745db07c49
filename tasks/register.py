"""Register stage: log the model to MLflow, register a version, move the aliases.

The registered model takes raw pixels (its first layer holds the normalization
stats), so a registry consumer needs nothing from this repository. Every version is
tagged with what made it (git commit, DVC hash of the dataset, resolved params, run id,
seed, determinism, library versions, device), so `python -m flows.reproduce` can rebuild
it. The registry's rules (a name bound to one task, fair promotion, aliases) live in
tasks/registry.py; a retried stage reuses the version its run already registered.
"""

from __future__ import annotations

import json
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

from tasks import data, registry, tracking
from tasks.config import PipelineConfig, dataset_identity
from tasks.models import load_model_file, with_normalization
from tasks.workspace import Workspace, read_json, write_json

CLASSIFIER_KERAS_ARTIFACT = "keras_model"  # the name classifier_model.py loads it by


def dvc_hash(path: Path) -> str:
    """The md5 DVC records for this output in dvc.lock (``<md5>.dir`` for a directory)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5")
    return obj.hash_info.value


def log_model(cfg: PipelineConfig, ws: Workspace) -> str:
    """Log the raw-pixel model to the active run as an MLflow pyfunc, register it; return the
    new version.

    The version is MLflow model code (tasks/serving/classifier_model.py, copied into the
    model) around the raw-pixel Keras file: `mlflow models serve` and
    `mlflow.pyfunc.load_model` answer with class names and probabilities, and loading it
    needs nothing from this repository.
    """
    import mlflow
    from mlflow.models import infer_signature

    stats = read_json(ws.norm_stats)
    raw_model = with_normalization(
        load_model_file(ws.model_file),
        stats["mean"],
        stats["std"],
        tta_flip=cfg.evaluate.tta_flip,
    )
    meta = data.load_meta(ws.prepared)
    images, _ = data.load_split(ws.prepared, "test")
    example = images[:2].astype("float32")  # raw pixels, 0..255
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        # The signature is given; MLflow would still ask for type hints on predict().
        warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
        keras_file = Path(scratch) / "model.keras"
        raw_model.save(keras_file)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=classifier_code(),
            artifacts={CLASSIFIER_KERAS_ARTIFACT: str(keras_file)},
            model_config={"class_names": list(meta["class_names"])},
            signature=infer_signature(example),
            input_example=example,
            registered_model_name=cfg.register.model_name,
            # Stated, not inferred: inference reloads the model in a subprocess (~6 s of ~7).
            pip_requirements=serving_requirements(),
        )
    return str(info.registered_model_version)


def classifier_code() -> str:
    """The path of the model code logged with every version (not imported here: it is the
    served model's module, which MLflow loads on its own)."""
    return str(Path(__file__).resolve().parent / "serving" / "classifier_model.py")


def serving_requirements() -> list[str]:
    """What loading the registered model needs: the exact TensorFlow and Keras trained with."""
    from importlib.metadata import version

    packages = ("tensorflow", "keras", "numpy", "pandas")
    return [f"{name}=={version(name)}" for name in packages]


def lineage_tags(cfg: PipelineConfig, ws: Workspace, run_id: str) -> dict[str, str]:
    """What made this version, enough to rebuild it (flows/reproduce.py)."""
    from importlib.metadata import version as installed

    from tasks import augment, recipe

    device = augment.resolve_device(cfg.preprocess.device)
    packages = ("tensorflow", "keras", "nvidia-dali-cuda120", "mlflow", "numpy")
    versions = {name: installed(name) for name in packages}
    return {
        "git_commit": tracking.git_commit(ws.root),
        "data_version": dvc_hash(ws.prepared),
        "params": json.dumps(cfg.flat(), sort_keys=True),
        "run_id": run_id,
        "seed": str(cfg.train.seed),
        # tasks/train.py: op determinism is on unless XLA is (Keras drops XLA under it).
        "deterministic": str(not recipe.resolve_xla(cfg.train.xla, device)).lower(),
        "versions": json.dumps(versions | {"python": platform.python_version()}),
        "device": tracking.device_description(device),
    }


def reevaluation(cfg: PipelineConfig, ws: Workspace) -> Any:
    """``accuracy(version)``: a registered version of this model on this run's test set
    (used only when the champion was evaluated on other data)."""

    def accuracy(version: str) -> float:
        images, labels = data.load_split(ws.prepared, "test")
        model = registry.load_version(cfg.register.model_name, version)
        raw = images.astype("float32")  # the registered model takes raw pixels
        logits = model.predict(raw, batch_size=cfg.evaluate.batch_size, verbose=0)
        return float((logits.argmax(axis=1) == labels).mean())

    return accuracy


def log_and_register(
    cfg: PipelineConfig, ws: Workspace, run_id: str, test_accuracy: float
) -> dict[str, Any]:
    """Check the name's binding, register the run's model once (a retry reuses its
    version), tag it, move aliases comparing like with like."""
    import mlflow

    client = mlflow.MlflowClient()
    name = cfg.register.model_name
    meta = data.load_meta(ws.prepared)
    wanted = registry.binding_of(
        dataset_identity(cfg.data.source, cfg.data.name), meta["image_shape"], meta["class_names"]
    )
    with registry.registry_lock(name):
        registry.bind_or_check(client, name, wanted)  # before anything is logged
    version = registry.version_of_run(client, name, run_id) or log_model(cfg, ws)
    tags = lineage_tags(cfg, ws, run_id) | {"test_accuracy": repr(test_accuracy)}
    if tags["git_commit"].endswith("-dirty"):  # what git lacks to rebuild this version
        mlflow.log_text(tracking.tracked_changes(ws.root), tracking.CHANGES_ARTIFACT)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = registry.move_aliases(
        client,
        name,
        version,
        test_accuracy,
        cfg.register.promote_margin,
        data_version=tags["data_version"],
        reevaluate=reevaluation(cfg, ws),
    )
    previous = aliases["previous_champion"]
    if previous.get("reevaluated"):
        on_this_data = repr(previous["compared_accuracy"])
        client.set_model_version_tag(name, version, "champion_compared", previous["version"])
        client.set_model_version_tag(name, version, "champion_accuracy_on_this_data", on_this_data)
        mlflow.log_metric("champion_accuracy_on_this_data", previous["compared_accuracy"])
    return {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "aliases": [registry.CHALLENGER, registry.CHAMPION]
        if aliases["promoted"]
        else [registry.CHALLENGER],
        **aliases,
        "test_accuracy": test_accuracy,
        "run_id": run_id,
        "git_commit": tags["git_commit"],
        "data_version": tags["data_version"],
    }


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The stage as `dvc repro` and the Prefect flow call it."""
    import mlflow

    metrics = read_json(ws.metrics)
    with tracking.stage_run(cfg, ws, "register") as run_id:
        record = log_and_register(cfg, ws, run_id, metrics["test"]["accuracy"])
        record["mlflow"] = tracking.run_url(run_id)
        write_json(ws.registration, record)
        mlflow.log_artifact(str(ws.registration), artifact_path="register")
        mlflow.set_tags(
            {"registered.version": record["version"], "registered.promoted": record["promoted"]}
        )
    return record
