"""End to end: the Prefect flow under a temporary Prefect server, same records as dvc repro."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import ConfigError
from tasks.workspace import Workspace
from tests.conftest import PARAMS, read_mlflow, tiny_overrides
from tests.pipeline_checks import check_pipeline_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_all_stages_and_registers_a_champion(prefect_server, tmp_path):
    import mlflow

    from flows.pipeline import training_pipeline

    overrides = tiny_overrides(tmp_path)
    state = training_pipeline(
        overrides=overrides, params_path=str(PARAMS), workdir=str(tmp_path), return_state=True
    )
    assert state.is_completed(), state
    record = state.result()
    client, runs = read_mlflow(overrides["mlflow.tracking_uri"], "cifar10-pipeline")
    assert len(runs) == 1
    assert runs[0].info.run_name.startswith("prefect-")
    ws = Workspace(tmp_path)
    registration = check_pipeline_run(client, runs[0], epochs=1, model_name="cifar10-cnn", ws=ws)
    assert registration == record
    assert str(client.get_model_version_by_alias("cifar10-cnn", "champion").version) == "1"

    # The registered model takes raw pixels and agrees with the evaluate stage's predictions.
    from tasks.data import load_meta, load_split

    images, _ = load_split(ws.prepared, "test")
    names = load_meta(ws.prepared)["class_names"]
    model = mlflow.tensorflow.load_model("models:/cifar10-cnn@champion")
    served = model.predict(images[:50].astype("float32"), verbose=0).argmax(axis=1)
    rows = ws.predictions.read_text().splitlines()[1:51]
    evaluated = [names.index(row.split(",")[1]) for row in rows]
    assert np.array_equal(served, evaluated)


def test_bad_override_fails_before_any_work(prefect_server, tmp_path):
    from flows.pipeline import training_pipeline

    overrides = tiny_overrides(tmp_path) | {"train.epoch": 3}
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        training_pipeline(overrides=overrides, params_path=str(PARAMS), workdir=str(tmp_path))
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "mlruns").exists()
