"""Register stage: log the model to MLflow, register a version, move the aliases.

What a version serves comes from the data's modality (its register.py part): an image
model takes raw pixels (its first layers hold the normalization stats and any resize),
a language model takes prompts (its vocabulary travels with it), so a registry consumer
needs nothing from this repository. Every version is
tagged with what made it (git commit, DVC hash of the dataset, resolved params, run id,
seed, determinism, library versions, device), so `python -m flows.reproduce` can rebuild
it. The registry's rules (a name bound to one task, fair promotion, aliases) live in
tasks/tracking/registry.py; a retried stage reuses the version its run already registered.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

from tasks import startup
from tasks.config import PipelineConfig, modality
from tasks.errors import refuse_non_finite
from tasks.modality import ServedModel
from tasks.tracking import describe, lineage, registry, runs, views
from tasks.tracking.registry_lock import registry_lock
from tasks.workspace import Workspace, read_json, write_json


def log_model(served: ServedModel, cfg: PipelineConfig) -> str:
    """Log the version's model to the active run as an MLflow pyfunc, register it; return
    the new version.

    The version is MLflow model code (tasks/serving/classifier_model.py for images,
    text_model.py for text, copied into the model) around the Keras file: `mlflow models
    serve` and `mlflow.pyfunc.load_model` answer with labels and probabilities (or
    generated text), and loading it needs nothing from this repository.
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    example = served.input_example
    inferred = infer_signature(example, params=served.params)
    # Declared, not inferred: the outputs are what the model code answers (the UI's schema).
    signature = ModelSignature(inferred.inputs, served.output_schema, inferred.params)
    with warnings.catch_warnings():
        # The signature is given; MLflow would still ask for type hints on predict().
        warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
        # MLflow's register_model prints "Registered model ... already exists. Creating a new
        # version" for every version: bind_or_check created the model first, on purpose.
        with startup.routed_stderr_lines(lambda line: "already exists. Creating" in line):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(served.code),
                artifacts={key: str(path) for key, path in served.artifacts.items()},
                model_config=served.model_config,
                signature=signature,
                input_example=(example, served.params) if served.params else example,
                registered_model_name=cfg.register.model_name,
                # Stated, not inferred: inference reloads the model in a subprocess (~6 s of ~7).
                pip_requirements=serving_requirements(),
            )
    return str(info.registered_model_version)


def serving_requirements() -> list[str]:
    """What loading the registered model needs: the exact TensorFlow and Keras trained with."""
    from importlib.metadata import version

    packages = ("tensorflow", "keras", "numpy", "pandas")
    return [f"{name}=={version(name)}" for name in packages]


def keep_data(ws: Workspace) -> lineage.KeptData:
    """The prepared data and preprocess's outputs into the project's DVC cache and remote,
    however this pipeline was started (`dvc repro`, a flow run in runs/<id>/, a sweep, a
    retrain, `dvc exp run`): the version's tags name them by hash, and any clone sharing
    the remote restores them (flows/reproduce/)."""
    outputs = {"data/prepared": ws.prepared, "data/preprocess": ws.preprocessed}  # dvc.yaml outs
    kept = lineage.keep_in_dvc(ws.root, outputs)
    listed = ", ".join(f"{path} {md5}" for path, md5 in kept.hashes.items())
    print(f"data: {listed} kept in {kept.storage}", flush=True)
    return kept


def lineage_tags(
    cfg: PipelineConfig, ws: Workspace, run_id: str, kept: lineage.KeptData
) -> dict[str, str]:
    """What made this version, enough to rebuild it (flows/reproduce/)."""
    from importlib.metadata import version as installed

    from tasks.training import recipe
    from tasks.training.device import resolve_device

    device = resolve_device(cfg.preprocess.device)
    packages = ("tensorflow", "keras", "nvidia-dali-cuda120", "mlflow", "numpy")
    versions = {name: installed(name) for name in packages}
    return {
        "git_commit": lineage.git_commit(ws.root),
        "data_version": kept.hashes["data/prepared"],
        "preprocess_version": kept.hashes["data/preprocess"],
        "data_storage": kept.storage,
        "params": json.dumps(cfg.flat(), sort_keys=True),
        "run_id": run_id,
        "seed": str(cfg.train.seed),
        # tasks/stages/train.py: op determinism is on unless XLA is (Keras drops XLA under it).
        "deterministic": str(not recipe.resolve_xla(cfg.train.xla, device)).lower(),
        "versions": json.dumps(versions | {"python": platform.python_version()}),
        "device": lineage.device_description(device),
        "onednn": str(lineage.onednn_enabled()).lower(),
    }


def log_and_register(
    cfg: PipelineConfig, ws: Workspace, run_id: str, test_accuracy: float, kept: lineage.KeptData
) -> dict[str, Any]:
    """Check the name's binding, register the run's model once (a retry reuses its
    version), tag it, move aliases comparing like with like."""
    import mlflow

    if modality(cfg.data.source) == "text":
        from tasks.text.register import served_model
    else:
        from tasks.images.register import served_model
    client = mlflow.MlflowClient()
    name = cfg.register.model_name
    with tempfile.TemporaryDirectory() as scratch:
        served = served_model(cfg, ws, Path(scratch))
        with registry_lock(name, announce=False):  # move_aliases says which lock
            registry.bind_or_check(client, name, served.binding)  # before anything is logged
        version = registry.version_of_run(client, name, run_id) or log_model(served, cfg)
    tags = lineage_tags(cfg, ws, run_id, kept) | {"test_accuracy": repr(test_accuracy)}
    if tags["git_commit"].endswith("-dirty"):  # what git lacks to rebuild this version
        mlflow.log_text(lineage.tracked_changes(ws.root), lineage.CHANGES_ARTIFACT)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = registry.move_aliases(
        client,
        name,
        version,
        test_accuracy,
        cfg.register.promote_margin,
        data_version=tags["data_version"],
        reevaluate=served.reevaluate,
    )
    describe_version(client, cfg, served, version, test_accuracy, aliases, tags)
    lock = aliases["lock"]  # which lock serialized the alias moves, and when: bookkeeping,
    run_tags = {
        "registry.lock": f"{lock['kind']}: {lock['name']}",
        "registry.lock_held": lock["held"],
    }
    previous = aliases["previous_champion"]  # so on the run, not among the version's tags
    if previous.get("reevaluated"):
        run_tags["registry.champion_compared"] = previous["version"]
        run_tags["registry.champion_accuracy_on_this_data"] = repr(previous["compared_accuracy"])
    for key, value in run_tags.items():
        client.set_tag(run_id, key, value)
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


def describe_version(
    client: Any,
    cfg: PipelineConfig,
    served: ServedModel,
    version: str,
    test_accuracy: float,
    aliases: dict[str, Any],
    lineage: dict[str, str],
) -> None:
    """The descriptions the registry UI shows: the model's (what it serves, how to load it)
    and the version's (how good, on which data, why it is or is not the champion)."""
    name = cfg.register.model_name
    what = f"A `{cfg.model.name}` model for {served.binding['dataset']}"
    client.update_registered_model(
        name, describe.model_description(name, what, served.interface, served.classes)
    )
    client.update_model_version(
        name,
        version,
        describe.version_description(
            f"models:/{name}/{version}",
            test_accuracy,
            aliases,
            lineage,
            cfg.register.promote_margin,
        ),
    )


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The stage as `dvc repro` and the Prefect flow call it."""
    import mlflow

    metrics = read_json(ws.metrics)
    refuse_non_finite(  # null in metrics.json is a NaN evaluate wrote
        {k: math.nan if v is None else v for k, v in metrics["test"].items()}, "register"
    )
    with runs.stage_run(cfg, ws, "register") as run_id:
        kept = keep_data(ws)  # before the version exists: one no clone can rebuild never does
        record = log_and_register(cfg, ws, run_id, metrics["test"]["accuracy"], kept)
        record["mlflow"] = runs.run_url(run_id)
        write_json(ws.registration, record)
        mlflow.log_artifact(str(ws.registration), artifact_path="register")
        mlflow.set_tags(
            {"registered.version": record["version"], "registered.promoted": record["promoted"]}
        )
        experiment = record["mlflow"]["experiment_id"]
        views.refresh_runs_view(
            mlflow.MlflowClient(), experiment, list(runs.test_metrics(metrics["test"]))
        )
    return record
