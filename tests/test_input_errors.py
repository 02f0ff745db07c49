"""Broken inputs fail as a user would meet them: one line, exit status 2, no run left open.

Each fault is built for real in a temporary project (the real params.yaml, shrunk as
conftest.py does) and the real entry point runs on it in a subprocess, the way
`dvc repro` (``python -m flows.stage``) and ``python -m flows.pipeline`` run it. The
MLflow store of the project is then read back: a stage that failed inside its MLflow run
closed it FAILED, one that failed before opened none, and one that failed after an
earlier stage left the pipeline run open closed that run too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tasks.config import PipelineConfig, load_config
from tasks.workspace import Workspace, write_json
from tests.helpers.project import (
    PARAMS,
    make_project,
    run_entry_point,
    run_statuses,
    the_error_line,
)


def project_config(root: Path) -> PipelineConfig:
    return load_config(root / "params.yaml")


def write_synthetic_prepared(root: Path) -> Workspace:
    """data/prepared/ as the data stage writes it, without opening an MLflow run."""
    from tasks.images import data

    cfg, ws = project_config(root), Workspace(root)
    data.write_prepared(data.prepare_dataset(cfg.data, root), ws.prepared, cfg.data)
    return ws


def truncate(path: Path, keep: float = 0.5) -> None:
    payload = path.read_bytes()
    path.write_bytes(payload[: int(len(payload) * keep)])


# --------------------------------------------------------------------------- data stage


def test_garbage_idx_files_are_named(tmp_path):
    idx_dir = tmp_path / "idx"
    root = make_project(
        tmp_path / "project", **{"data.source": "idx", "data.idx_dir": str(idx_dir)}
    )
    idx_dir.mkdir()
    for stem in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (idx_dir / f"{stem}-ubyte").write_bytes(b"this is no IDX file, just text\n" * 40)

    line = the_error_line(run_entry_point(root, "flows.stage", "data"), "error in stage 'data'")
    # The first file read is named: the train labels, or the images when class names come
    # from TFDS metadata.
    assert re.search(rf"{re.escape(str(idx_dir))}/train-\w+-idx[13]-ubyte: not an IDX file", line)
    # Raised inside the stage's MLflow run, which the stage closed.
    assert run_statuses(root) == ["FAILED"]


def test_a_wrong_archive_in_the_manual_dir_is_named(tmp_path):
    """Offline, with a file of the right name in data.manual_dir: TFDS uses it (no DNS
    probe, no download) and refuses its checksum; the stage names the file."""
    root = make_project(tmp_path / "project", **{"data.source": "tfds", "data.name": "cifar10"})
    archive = root / "data" / "manual" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"\x1f\x8b not the CIFAR-10 archive" * 40)

    line = the_error_line(run_entry_point(root, "flows.stage", "data"), "error in stage 'data'")
    assert f"{archive} (in data.manual_dir) is not the archive TFDS expects for 'cifar10'" in line
    assert "1080 bytes" in line and "expected 170052171 bytes" in line
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in line
    assert run_statuses(root) == ["FAILED"]


def test_an_unknown_tfds_name_fails_at_config_validation(tmp_path):
    root = make_project(tmp_path / "project", **{"data.source": "tfds", "data.name": "cifar11"})

    line = the_error_line(run_entry_point(root, "flows.stage", "data"), "error in stage 'data'")
    assert "config key 'data.name': 'cifar11' is not a TFDS dataset" in line
    assert "did you mean" in line and "cifar10" in line
    assert run_statuses(root) == []  # before any work: no run, no store
    assert not (root / "data").exists()


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    root = make_project(tmp_path / "project")
    params = root / "params.yaml"
    lines = params.read_text().splitlines()
    at = lines.index("train:") + 2  # 1-based number of the line after "train:"
    lines.insert(at - 1, "  epochs: [1, 2")  # an unclosed flow sequence
    params.write_text("\n".join(lines) + "\n")

    line = the_error_line(run_entry_point(root, "flows.stage", "data"), "error in stage 'data'")
    # The path as given (dvc.yaml's default, params.yaml); PyYAML notices on the next line.
    assert f"'data': params.yaml, line {at + 1}, column" in line
    assert "not valid YAML" in line and "fix the syntax" in line
    assert run_statuses(root) == []


# ------------------------------------------------------------------------- later stages


def test_a_truncated_prepared_split_is_named_and_closes_the_open_run(tmp_path):
    """As under `dvc repro`: the data stage ran and left the pipeline run open for the
    next stage; preprocess then finds train.npz truncated, before it joins that run."""
    from tasks.stages import data as data_stage

    root = make_project(tmp_path / "project")
    ws = Workspace(root)
    data_stage.run(project_config(root), ws)
    assert run_statuses(root) == ["FINISHED"] and ws.run_handle.is_file()
    truncate(ws.prepared / "train.npz")

    done = run_entry_point(root, "flows.stage", "preprocess")
    line = the_error_line(done, "error in stage 'preprocess'")
    assert f"{ws.prepared / 'train.npz'} cannot be read" in line and "dvc repro data" in line
    assert run_statuses(root) == ["FAILED"]
    assert not ws.run_handle.exists()  # the next stage starts a fresh run


def test_a_truncated_model_file_is_named(tmp_path):
    import keras

    root = make_project(tmp_path / "project")
    ws = write_synthetic_prepared(root)
    write_json(ws.norm_stats, {"mean": [127.0] * 3, "std": [64.0] * 3})
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    ws.model_file.parent.mkdir(parents=True)
    model.save(ws.model_file)
    truncate(ws.model_file)

    done = run_entry_point(root, "flows.stage", "evaluate")
    line = the_error_line(done, "error in stage 'evaluate'")
    assert f"{ws.model_file} is not a .keras archive (" in line and "truncated" in line
    assert "dvc repro train" in line
    assert run_statuses(root) == []


# ------------------------------------------------------------------------ the pipeline


@pytest.mark.parametrize("fault", ["unknown dataset name", "yaml syntax", "garbage idx"])
def test_the_pipeline_entry_point_reports_the_same_faults(tmp_path, fault):
    """As one line, exit 2, without a traceback, also when the fault is found inside a
    stage of the Prefect flow (Prefect then logs the Failed state's message only)."""
    root = make_project(tmp_path / "project", **{"data.source": "tfds"})
    params = root / "params.yaml"
    statuses: list[str] = []
    if fault == "yaml syntax":
        params.write_text(params.read_text().replace("train:\n", "train:\n  [\n", 1))
        args, named = [], f"{params}, line"
    elif fault == "unknown dataset name":
        args, named = ["data.name=cifar11"], "config key 'data.name': 'cifar11'"
    else:
        idx_dir = tmp_path / "idx"
        idx_dir.mkdir()
        (idx_dir / "train-labels-idx1-ubyte").write_bytes(b"no IDX file here\n" * 40)
        args = ["data.source=idx", f"data.idx_dir={idx_dir}", "data.name=fashion_mnist"]
        named, statuses = "stage 'data' failed: IdxFormatError", ["FAILED"]

    line = the_error_line(run_entry_point(root, "flows.pipeline", *args), "error:")
    assert named in line
    assert run_statuses(root) == statuses
    assert not (root / "data" / "prepared").exists()


# --------------------------------------------------------------------- in-process checks


def test_yaml_errors_in_profiles_and_overrides_name_their_source(tmp_path):
    from tasks.config import ConfigError, load_profile, parse_override

    profile = tmp_path / "profile.yaml"
    profile.write_text("train.epochs: 3\ntrain.batch_size: [64\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(profile))}, line 3, column 1: not"):
        load_profile(profile)
    with pytest.raises(ConfigError, match=r"override 'train\.epochs=\[3': the value is not valid"):
        parse_override("train.epochs=[3")


@pytest.mark.parametrize(
    ("overrides", "accepted"),
    [
        ({"data.source": "tfds", "data.name": "cifar10:3.0.2"}, True),  # tfds.builder syntax
        ({"data.source": "tfds", "data.name": "fashion_mnist"}, True),
        ({"data.source": "idx", "data.name": "not_in_tfds"}, True),  # only names classes
        ({"data.source": "synthetic", "data.name": "not_in_tfds"}, True),
        ({"data.source": "tfds", "data.name": "fasion_mnist"}, False),
    ],
)
def test_only_a_tfds_source_checks_the_dataset_name(overrides, accepted):
    from tasks.config import ConfigError

    if accepted:
        load_config(PARAMS, overrides)
    else:
        with pytest.raises(ConfigError, match=r"'data\.name': .*did you mean fashion_mnist"):
            load_config(PARAMS, overrides)


def test_a_corrupt_meta_file_is_named(tmp_path):
    from tasks import prepared
    from tasks.errors import DataFileError

    (tmp_path / "meta.json").write_text('{"class_names": [')
    with pytest.raises(DataFileError, match=rf"{re.escape(str(tmp_path / 'meta.json'))} is not"):
        prepared.load_meta(tmp_path)


def test_an_offline_download_under_the_stage_cli_ends_its_run_failed(tmp_path):
    """`make run` offline: the data stage's download finds no network (a transient cause,
    which a Prefect retry would join), but the stage process exits, so its MLflow run
    must end FAILED with the reason, not stay RUNNING for a later run to call orphaned."""
    import mlflow

    root = make_project(tmp_path / "project", **{"data.source": "tfds", "data.name": "mnist"})
    result = run_entry_point(root, "flows.stage", "data")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert run_statuses(root) == ["FAILED"], "no run may stay RUNNING"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "stage data" in run.data.tags["pipeline.end_reason"]
    assert not Workspace(root).run_handle.exists()


def crafted_keras_file(path: Path, edit) -> Path:
    """A real .keras file of a tiny model whose config.json ``edit`` rewrites (an attacker's
    file, or one a disk or a copy damaged)."""
    import json as jsonlib
    import zipfile

    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="dense")])
    clean = path.with_suffix(".clean.keras")
    model.save(clean)
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                data = jsonlib.dumps(edit(jsonlib.loads(data))).encode()
            target.writestr(item, data)
    return path


def test_a_model_file_naming_a_foreign_function_is_refused_in_one_line(tmp_path):
    """A config asking Keras for `os.system` as a layer: nothing runs, and the loader
    answers with the file's name, not Keras' TypeError."""
    from tasks.errors import ModelFileError
    from tasks.models.files import load_model_file

    def os_system(config):
        layer = config["config"]["layers"][-1]
        layer.update({"module": "os", "class_name": "system", "registered_name": None})
        return config

    path = crafted_keras_file(tmp_path / "model.keras", os_system)
    with pytest.raises(ModelFileError, match=r"model\.keras is not a loadable Keras model"):
        load_model_file(path)


def test_a_truncated_model_file_says_truncated_not_missing(tmp_path):
    from tasks.errors import ModelFileError
    from tasks.models.files import load_model_file

    path = crafted_keras_file(tmp_path / "model.keras", lambda config: config)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"is not a \.keras archive \(\d+ bytes: truncated"):
        load_model_file(path)


@pytest.fixture
def project_with_full_data_disk(tmp_path):
    """A project whose data/ is a 1 MiB tmpfs: the data stage's outputs do not fit, while
    the MLflow store beside it has room. Needs root (CI runs as root)."""
    root = make_project(tmp_path / "project")
    mount = root / "data"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {done.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_in_the_data_stage_is_one_line_naming_the_path(project_with_full_data_disk):
    """ENOSPC while the data stage writes: exit 2, one line with the path, what the errno
    means and the fix, no traceback; the run ends FAILED; no half-written data/prepared."""
    root = project_with_full_data_disk
    done = run_entry_point(root, "flows.stage", "data")
    line = the_error_line(done, "error in stage 'data'")
    assert str(root / "data") in line and "No space left on device (ENOSPC)" in line, line
    assert "free space there" in line
    assert run_statuses(root) == ["FAILED"]
    assert not (root / "data" / "prepared").exists()
    assert not list((root / "data").glob(".prepared*")), "the staging folder was removed"


def test_an_image_too_small_for_the_model_stops_the_flow_before_any_work(tmp_path):
    """data.synthetic.image_size=8 with seed_cnn: one line naming the key and the smallest
    size, before a run is opened or data made (it used to fail in training, with Keras'
    traceback and colour codes in the run's end reason)."""
    root = make_project(tmp_path / "project", **{"data.synthetic.image_size": 8})
    done = run_entry_point(root, "flows.pipeline", "--workdir", ".")
    line = the_error_line(done, "error:")
    assert "data.synthetic.image_size=8 is too small for model.name 'seed_cnn'" in line, line
    assert run_statuses(root) == [] and not (root / "data" / "prepared").exists()
