"""Assertions both end-to-end tests make on what one pipeline run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.tracking.views import VIEW_KEY, VIEW_TAG_PREFIX, read_view_state
from tasks.workspace import Workspace

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


def check_pipeline_run(client, run, *, epochs: int, model_name: str, ws: Workspace) -> dict:
    """The run has params, per-epoch and test metrics, plots, the model; returns registration."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == str(epochs)
    assert params["data.source"] == "synthetic"
    assert params["model.name"] == "seed_cnn"
    for name in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(epochs)), name
    metrics = json.loads(ws.metrics.read_text())
    assert run.data.metrics["test/accuracy"] == metrics["test"]["accuracy"]
    # What the MLflow UI draws: the per-epoch curves unprefixed (its first chart section),
    # every other metric in a section of its prefix; dataset sizes are params, not charts.
    # Keras' per-epoch curves under Keras' names (the UI's "Model metrics" section), the
    # headline in a "test" section; per-class and export numbers are artifacts, not charts.
    assert set(run.data.metrics) == {*EPOCH_METRICS, "test/accuracy", "test/loss", "test/macro_f1"}
    counts = json.loads((ws.prepared / "meta.json").read_text())["counts"]
    assert {f"data.{split}_examples": str(n) for split, n in counts.items()}.items() <= (
        params.items()
    )
    # Told apart in the runs table: a name saying what it is, who and what started it,
    # the prepared data as the run's dataset input (its DVC hash as the digest).
    assert run.info.run_name.startswith("seed_cnn-synthetic-"), run.info.run_name
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    (dataset,) = [entry.dataset for entry in run.inputs.dataset_inputs]
    assert dataset.name == "synthetic"
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert sum(len(group) for group in metrics.values()) <= 8, "headline only (dvc metrics show)"
    per_class = json.loads(ws.per_class.read_text())
    assert len(per_class) == 10
    assert {"precision", "recall", "f1", "support"} <= set(per_class["class_0"])

    artifacts = artifact_paths(client, run.info.run_id)
    for expected in (
        "config/resolved_params.json",
        "preprocess/augmented_samples.png",
        "preprocess/norm_stats.json",
        "evaluate/confusion_matrix.png",
        "evaluate/metrics.json",
        "evaluate/per_class.json",
        "train/history.csv",
        "train/training_curves.png",
        "register/registration.json",
        "exports/parity.json",
        "exports/saved_model/saved_model.pb",
    ):
        assert expected in artifacts, f"{expected} not among {sorted(artifacts)}"
    for png in (ws.augmented_grid, ws.confusion_png, ws.training_curves):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    registration = json.loads(ws.registration.read_text())
    assert registration["run_id"] == run.info.run_id
    version = client.get_model_version(model_name, registration["version"])
    assert version.run_id == run.info.run_id
    assert version.tags["run_id"] == run.info.run_id
    assert json.loads(version.tags["params"])["train.epochs"] == epochs
    assert version.tags["data_version"].endswith(".dir")
    assert float(version.tags["test_accuracy"]) == metrics["test"]["accuracy"]
    assert dataset.digest == version.tags["data_version"]
    # Bookkeeping on the run; what a person reads in the descriptions.
    assert not [key for key in version.tags if key.startswith(("registry.", "export"))]
    assert run.data.tags["registry.lock"] and run.data.tags["registry.lock_held"]
    accuracy = f"Test accuracy **{metrics['test']['accuracy']:.4f}**"
    assert accuracy in version.description and "champion" in version.description
    listing = f"saved_model: `runs:/{run.info.run_id}/exports/saved_model`"  # export's part
    assert listing in version.description, version.description
    model = client.get_registered_model(model_name)
    assert "Input: raw pixels" in model.description and "class_9" in model.description
    info = mlflow.models.get_model_info(f"models:/{model_name}/{version.version}")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 32, 32, 3)
    outputs = [column["name"] for column in info.signature.outputs.to_dict()]
    assert outputs == ["label", "class_index", "score", "probabilities"]
    # The experiment's saved view shows the headline in the runs table.
    experiment = client.get_experiment(run.info.experiment_id)
    view = read_view_state(experiment.tags[VIEW_TAG_PREFIX + VIEW_KEY])
    assert "metrics.`test/accuracy`" in view["selectedColumns"]
    return registration


def read_registration(root: Path) -> dict:
    return json.loads(Workspace(root).registration.read_text())
