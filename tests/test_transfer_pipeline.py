"""Transfer learning through the whole pipeline: a base trained here, registered and
exported, then reused as model.weights=models:/... under the real `dvc repro`.

Synthetic 28x28 grayscale data, resized to 32x32 RGB by DALI for a MobileNetV2 base (the
smallest of the four): the point is the plumbing (which weights arrive where, which
layers change in which phase), not accuracy; tests/test_transfer.py covers the pieces
(a registered base by version and by alias included). The Prefect flow runs the same
stages: the README's transfer block runs it (`python -m flows.pipeline`) on Fashion-MNIST,
pretraining a base and transferring it from the registry.
"""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest
import yaml

from benchmarks.common import copy_repo, set_params
from tasks.workspace import Workspace
from tests.helpers.project import (
    TINY,
    dvc_repro,
    experiment_of,
    module_command,
    pipeline_env,
    read_mlflow,
)

pytestmark = pytest.mark.slow

NAME = "synthetic-transfer"  # register.model_name: auto
PRETRAIN = TINY | {
    "data.synthetic.train_size": 600,
    "data.synthetic.test_size": 200,
    "data.synthetic.image_size": 28,
    "data.synthetic.channels": 1,
    "model.name": "transfer",
    "model.base": "mobilenet_v2",
    "model.head": "pool",
    "model.input_size": 32,
    "model.weights": "none",  # from scratch: one phase, every layer trains
    "model.unfreeze": 2,
    "train.frozen_epochs": 1,
    "train.finetune_epochs": 1,
}
FROM_REGISTRY = {"model.weights": f"models:/{NAME}@champion"}
IMAGENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def registered_base(uri: str, version: str):
    import mlflow

    from tasks.models.transfer import _find_base
    from tasks.tracking import registry

    mlflow.set_tracking_uri(uri)
    try:
        model = registry.load_version(NAME, version)
    finally:
        mlflow.set_tracking_uri(None)
    base, _ = _find_base(model)
    return base


def assert_transferred(uri: str, pretrained: str, transferred: str, unfreeze: int) -> None:
    """Every base layer below the fine-tuned top holds the pretrained weights bit for bit
    (BatchNorm statistics included); the top ``unfreeze`` weighted layers moved."""
    from tasks.models.transfer import tunable_layers

    before, after = registered_base(uri, pretrained), registered_base(uri, transferred)
    tuned = {layer.name for layer in tunable_layers(after)[-unfreeze:]}
    for old, new in zip(before.layers, after.layers, strict=True):
        for w_old, w_new in zip(old.get_weights(), new.get_weights(), strict=True):
            if new.name in tuned:
                assert not np.array_equal(w_old, w_new), f"{new.name} was fine-tuned"
            else:
                np.testing.assert_array_equal(w_old, w_new, err_msg=new.name)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("transfer-repo"))
    set_params(root, PRETRAIN)
    dvc_repro(root)
    return root, f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def test_a_registered_base_is_transferred_under_dvc_repro(pretrained):
    root, uri = pretrained
    set_params(root, FROM_REGISTRY)
    # Up to register: the base's run exported this architecture already (the fixture).
    output = dvc_repro(root, "register")
    ran = [s for s in ("data", "preprocess", "train") if f"Running stage '{s}'" in output]
    assert ran == ["train"], "only model.weights changed: data and preprocess stay cached"
    assert_transferred(uri, "1", "2", PRETRAIN["model.unfreeze"])

    # Two phases in one run, epochs numbered on, each epoch marked with its phase.
    rows = list(csv.DictReader((Workspace(root).history).open()))
    assert [(r["epoch"], r["phase"]) for r in rows] == [("0", "0.0"), ("1", "1.0")]
    experiment = experiment_of(root)
    client, runs = read_mlflow(uri, experiment)
    phases = client.get_metric_history(runs[0].info.run_id, "phase")
    assert [(m.step, m.value) for m in phases] == [(0, 0.0), (1, 1.0)]
    assert (
        client.get_run(runs[0].info.run_id).data.params["model.weights"]
        == FROM_REGISTRY["model.weights"]
    )


def test_imagenet_weights_offline_fail_before_any_work_naming_the_file(pretrained, tmp_path):
    """No network, an empty Keras cache: the train stage names the file and where it goes,
    in well under the time TFDS-style retries would take, and opens no MLflow run."""
    root, uri = pretrained
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["weights"] = "imagenet"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    keras_home = tmp_path / "keras"
    env = pipeline_env() | {"KERAS_HOME": str(keras_home)}
    done = subprocess.run(
        module_command("flows.stage", "train", "--params", str(tmp_path / "params.yaml")),
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    weights_file = keras_home / "models" / IMAGENET_FILE
    if done.returncode == 0:  # a machine with network: Keras' own download filled the cache
        assert weights_file.is_file()
        return
    assert done.returncode == 2, done.stderr[-3000:]
    assert IMAGENET_FILE in done.stderr and str(weights_file.parent) in done.stderr
    assert "Traceback" not in done.stderr
    _, runs = read_mlflow(uri, experiment_of(root))
    assert all(run.info.status != "RUNNING" for run in runs)
    assert not weights_file.exists(), "nothing half-downloaded is left in the cache"
