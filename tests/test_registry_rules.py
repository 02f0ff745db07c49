"""Registry rules on real pipelines (CPU, tiny synthetic data, a real MLflow store): a
registered name serves one task, default names never collide, promotion compares like
with like."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from flows.stage import STAGE_NAMES, stage_functions
from tasks.config import load_config
from tasks.errors import RegistryBindingError
from tasks.tracking import registry
from tasks.workspace import Workspace, read_json
from tests.helpers.project import PARAMS, TINY, tiny_overrides

pytestmark = pytest.mark.slow
NAME = "rules"


def run_pipeline(root, **overrides) -> tuple[object, Workspace]:
    """All five stages in ``root`` into the shared store one level up."""
    cfg = load_config(
        PARAMS, tiny_overrides(root.parent) | {"register.model_name": NAME} | overrides
    )
    ws = Workspace(root)
    for name in STAGE_NAMES:
        stage_functions()[name](cfg, ws)
    return cfg, ws


def store(tmp_path) -> mlflow.MlflowClient:
    uri = tiny_overrides(tmp_path)["mlflow.tracking_uri"]
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def test_default_names_say_which_data_and_model():
    synthetic = load_config(PARAMS, TINY).register.model_name
    idx = load_config(
        PARAMS, {"data.source": "idx", "data.name": "fashion_mnist", "model.name": "fast_cnn"}
    ).register.model_name
    assert synthetic == "synthetic-seed_cnn"
    assert idx == "fashion_mnist-fast_cnn"
    assert load_config(PARAMS).register.model_name == "cifar10-seed_cnn"
    assert load_config(PARAMS, {"register.model_name": "mine"}).register.model_name == "mine"
    versioned = load_config(PARAMS, {"data.name": "cifar10:3.0.2"}).register.model_name
    assert versioned == "cifar10_3.0.2-seed_cnn"


def test_a_version_for_another_input_shape_is_refused(tmp_path):
    run_pipeline(tmp_path / "rgb")  # 32x32x3: binds the name
    client = store(tmp_path)
    before = client.get_registered_model(NAME)
    assert before.tags["input_shape"] == "[-1, 32, 32, 3]" and before.tags["dataset"] == "synthetic"

    gray = {"data.synthetic.image_size": 28, "data.synthetic.channels": 1}
    with pytest.raises(RegistryBindingError, match=r"'rules' serves another task") as refused:
        run_pipeline(tmp_path / "gray", **gray)
    assert "[-1, 32, 32, 3] vs this run's [-1, 28, 28, 1]" in str(refused.value)
    assert "register.model_name" in str(refused.value)

    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    after = client.get_registered_model(NAME)
    assert after.aliases == before.aliases == {"champion": 1, "challenger": 1}
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    failed = [run for run in runs if run.info.status != "FINISHED"]
    [run] = failed
    assert run.info.status == "FAILED"
    assert "serves another task" in run.data.tags["pipeline.end_reason"]


def test_a_champion_from_other_data_is_evaluated_again_on_the_candidates(tmp_path):
    """Data versions A and B: same shape and classes, different seeds. The decision for the
    candidate on B uses the champion's accuracy on B's test set, not its number from A."""
    run_pipeline(tmp_path / "a", **{"data.seed": 1})
    cfg_b, ws_b = run_pipeline(tmp_path / "b", **{"data.seed": 2})
    record = read_json(ws_b.registration)
    previous = record["previous_champion"]
    assert previous["version"] == "1" and previous["reevaluated"] is True
    assert previous["data_version"] != record["data_version"]

    # The champion's accuracy on B's test set, computed here independently.
    from tasks import prepared

    images, labels = prepared.load_split(ws_b.prepared, "test")
    champion = registry.load_version(NAME, "1")
    expected = float(
        (champion.predict(images.astype(np.float32), verbose=0).argmax(1) == labels).mean()
    )
    assert previous["compared_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert record["promoted"] == registry.should_promote(
        record["test_accuracy"], expected, cfg_b.register.promote_margin
    )
    client = store(tmp_path)
    version = client.get_model_version(NAME, record["version"])
    assert "re-evaluated on this version's test data" in version.description
    run = client.get_run(record["run_id"])
    compared = float(run.data.tags["registry.champion_accuracy_on_this_data"])
    assert compared == pytest.approx(expected)
    assert f"version 1 ({expected:.4f}" in version.description


def test_every_version_carries_its_lineage(tmp_path):
    cfg, ws = run_pipeline(tmp_path / "lineage")
    client = store(tmp_path)
    record = read_json(ws.registration)
    tags = client.get_model_version(NAME, record["version"]).tags
    for key in ("git_commit", "data_version", "params", "run_id", "test_accuracy", "seed"):
        assert tags[key], key
    assert tags["seed"] == str(cfg.train.seed)
    assert tags["deterministic"] == "true"  # CPU: no XLA, op determinism on
    import json

    versions = json.loads(tags["versions"])
    assert {"tensorflow", "keras", "nvidia-dali-cuda120", "python"} <= set(versions)
    assert tags["device"].startswith("CPU")


@pytest.mark.parametrize("entry", ["flows.pipeline", "flows.stage"])
def test_a_name_bound_to_other_data_is_refused_before_the_data_stage(tmp_path, entry):
    """`register.model_name=fashion_mnist-fast_cnn` on synthetic data: refused from the config
    alone, before any data is read or an MLflow run opened, and said once."""
    from tests.helpers.project import make_project, run_entry_point

    root = make_project(tmp_path / "project", **{"register.model_name": "fashion_mnist-fast_cnn"})
    client = store(root)
    client.create_registered_model("fashion_mnist-fast_cnn", tags={"dataset": "fashion_mnist"})
    args = ("data",) if entry == "flows.stage" else ("--workdir", ".")
    result = run_entry_point(root, entry, *args)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    said = [line for line in output.splitlines() if "serves another task" in line]
    assert len(said) == 1, output
    assert "dataset fashion_mnist vs this run's synthetic" in said[0]
    assert "Traceback" not in output
    assert not (root / "data" / "prepared").exists(), "the data stage did no work"
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == [], "no MLflow run was opened"
