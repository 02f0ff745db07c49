"""Batch prediction (flows/predict.py, tasks/images/decode.py) with real components.

The model is the session's tiny registered version (tests/fixtures/servers.py
`served_pipeline`: 28x28 grayscale synthetic data, a real SQLite MLflow store); the images
are PNG files written from its test split, decoded by DALI on the CPU. The answers are
compared with what `mlflow.pyfunc.load_model(uri).predict` gives for the same pixels. The
deployment is run on the real Prefect server in tests/test_operate.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from nvidia.dali import backend
from PIL import Image

from flows.predict import find_images, main
from tasks import prepared
from tasks.errors import ModelRequestError
from tasks.images.decode import Decoder, read_image
from tasks.serving.registered import check_model_code, parse_model_uri
from tests.helpers.files import png_bytes, read_csv
from tests.helpers.project import call_main

MODEL = "synthetic-seed_cnn"


@pytest.fixture
def store(served_pipeline, monkeypatch):
    """The served pipeline's store as the one MLFLOW_TRACKING_URI names; its test split."""
    cfg, ws, registration = served_pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    images, _ = prepared.load_split(ws.prepared, "test")
    return registration, images


@pytest.fixture
def cli(capsys):
    """``main(argv)`` as `python -m flows.predict` runs it: (status, stdout, stderr); the
    signal handlers main installs are put back afterwards."""

    def run(*argv: str) -> tuple[int, str, str]:
        return call_main(main, argv, capsys)

    return run


def expected_answers(uri: str, pixels: np.ndarray):
    return mlflow.pyfunc.load_model(uri).predict(pixels.astype(np.float32))


def test_a_folder_is_predicted_like_the_registered_model_and_bad_files_are_set_aside(
    tmp_path, store, cli
):
    registration, images = store
    count = 12
    folder = tmp_path / "incoming"
    (folder / "more").mkdir(parents=True)
    for i in range(count):  # two folders: the listing is recursive and sorted
        (folder / ("more" if i >= 8 else "") / f"img_{i:02d}.png").write_bytes(png_bytes(images[i]))
    good = png_bytes(images[0])
    # Its header is fine, its pixel data cut short: only DALI finds out, inside a batch.
    (folder / "img_03_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    out, errors = tmp_path / "out" / "predictions.csv", tmp_path / "out" / "errors.csv"

    status, stdout, stderr = cli(
        folder,
        "--model",
        f"models:/{MODEL}@champion",
        "--top-k",
        3,
        "--out",
        out,
        "--errors",
        errors,
    )

    assert status == 0, stderr
    rows = read_csv(out)
    paths = [str(folder / f"img_{i:02d}.png") for i in range(8)]
    paths += [str(folder / "more" / f"img_{i:02d}.png") for i in range(8, count)]
    assert [row["path"] for row in rows] == paths
    expected = expected_answers(registration["model_uri"], images[:count])
    assert [row["label"] for row in rows] == list(expected["label"])
    assert [float(row["score"]) for row in rows] == pytest.approx(list(expected["score"]), abs=1e-6)
    for row, probabilities in zip(rows, expected["probabilities"], strict=True):
        top = json.loads(row["top_k"])
        best = sorted(probabilities.values(), reverse=True)[:3]
        assert [label for label, _ in top][0] == row["label"]
        assert [p for _, p in top] == pytest.approx(best, abs=1e-6)
        assert row["converted"] == ""
    failures = {Path(row["path"]).name: row["reason"] for row in read_csv(errors)}
    assert set(failures) == {"img_03_truncated.png", "notes.txt"}
    assert failures["img_03_truncated.png"].startswith("DALI could not decode it")
    assert failures["notes.txt"] == "not a PNG or JPEG image"
    assert f"{paths[0]}: {rows[0]['label']} " in stdout
    assert "skipped: not a PNG or JPEG image" in stdout
    assert f"12 of 14 files predicted by {registration['model_uri']}" in stdout


def test_color_depth_and_size_are_converted_to_the_models_input(tmp_path, store, cli):
    registration, images = store
    gray = images[0]  # (28, 28, 1) uint8
    folder = tmp_path / "mixed"
    folder.mkdir()
    # RGB with equal channels: its luma is the gray image itself.
    (folder / "a_rgb.png").write_bytes(png_bytes(np.repeat(gray, 3, axis=2)))
    # 16-bit: v * 257 spans the 16-bit range and comes back as v exactly.
    (folder / "b_deep.png").write_bytes(png_bytes(gray.astype(np.uint16) * 257, bits=16))
    (folder / "c_big.png").write_bytes(png_bytes(np.kron(gray, np.ones((2, 2, 1), np.uint8))))
    rgba = np.concatenate([np.repeat(gray, 3, axis=2), np.zeros_like(gray)], axis=2)
    (folder / "d_rgba.png").write_bytes(png_bytes(rgba))
    Image.fromarray(gray[..., 0]).save(folder / "e_photo.jpg", quality=95)
    out = tmp_path / "predictions.csv"

    status, _, stderr = cli(
        folder, "--model", registration["model_uri"], "--out", out, "--errors", tmp_path / "e.csv"
    )

    assert status == 0, stderr
    rows = {Path(row["path"]).name: row for row in read_csv(out)}
    assert rows["a_rgb.png"]["converted"] == "RGB to gray"
    assert rows["b_deep.png"]["converted"] == "16-bit to 8-bit"
    assert rows["c_big.png"]["converted"] == "resized 56x56 to 28x28"
    assert rows["d_rgba.png"]["converted"] == "RGB to gray; alpha dropped"
    assert rows["e_photo.jpg"]["converted"] == ""  # lossy: its label may differ
    [expected] = expected_answers(registration["model_uri"], gray[None])["label"]
    for name in ("a_rgb.png", "b_deep.png", "d_rgba.png"):
        assert rows[name]["label"] == expected, name


def test_dali_gives_a_gray_image_to_an_rgb_model_in_every_channel(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    deep = rng.integers(0, 2**16, (28, 28, 3), dtype=np.uint16)
    files = {"gray.png": png_bytes(gray), "deep.png": png_bytes(deep, bits=16)}
    loaded = []
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        loaded.append(read_image(tmp_path / name))
    rgb, deep_rgb = Decoder((28, 28, 3), "cpu").decode(loaded)
    assert np.array_equal(rgb, np.repeat(gray, 3, axis=2))
    assert np.array_equal(deep_rgb, np.round(deep / 257).astype(np.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(backend.GetCUDADeviceCount() == 0, reason="needs a CUDA GPU visible to DALI")
def test_the_gpu_decoder_gives_the_cpu_decoders_pixels(tmp_path):
    rng = np.random.default_rng(1)
    loaded = []
    for i, shape in enumerate([(28, 28, 1), (32, 32, 3), (40, 20, 3)]):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, shape, np.uint8)))
        loaded.append(read_image(tmp_path / f"{i}.png"))
    truncated = loaded[0].data[: len(loaded[0].data) // 2]
    loaded.append(dataclasses.replace(loaded[0], data=truncated))
    on_gpu, on_cpu = (Decoder((28, 28, 3), device).decode(loaded) for device in ("gpu", "cpu"))
    for gpu, cpu in zip(on_gpu[:3], on_cpu[:3], strict=True):
        assert np.abs(gpu.astype(int) - cpu.astype(int)).max() <= 1
    assert isinstance(on_gpu[3], str) and isinstance(on_cpu[3], str)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing-folder"], "no such file or directory"),
        (["{empty}"], "no PNG or JPEG file"),
        (["{folder}", "--model", "models:/bad name/1"], "is not a model URI"),
        (["{folder}", "--model", "runs:/0123/model"], "is not a model URI"),
        (["{folder}", "--model", "models:/x/1;id"], "is not a model URI"),
        (["{folder}", "--model", "models:/no-such-model/1"], "no registered model 'no-such-model'"),
        (["{folder}", "--model", f"models:/{MODEL}/99"], "has versions 1 to 1"),
        (["{folder}", "--model", f"models:/{MODEL}@nope"], f"{MODEL!r} has no alias 'nope'"),
        (["{folder}", "--top-k", "0"], "top-k 0 must be a whole number >= 1"),
        # The default model: params.yaml's register.model_name (cifar10-seed_cnn)@champion.
        (["{folder}"], "models:/cifar10-seed_cnn@champion: no registered model"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, store, cli, argv, message):
    registration, images = store
    folder, empty = tmp_path / "images", tmp_path / "empty"
    folder.mkdir()
    (folder / "one.png").write_bytes(png_bytes(images[0]))
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    out = tmp_path / "out"
    argv = [arg.format(folder=folder, empty=empty) for arg in argv]

    status, stdout, stderr = cli(*argv, "--out", out / "p.csv", "--errors", out / "e.csv")

    assert status == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert not out.exists(), "nothing written"


@pytest.mark.parametrize("uri", ["models:/a/1", "models:/a.b-c_d/12", "models:/a@champion"])
def test_model_uris_with_a_version_or_an_alias_pass_the_gate(uri):
    ref = parse_model_uri(uri)
    assert str(ref) == uri


def test_a_version_whose_model_code_is_not_the_projects_is_never_loaded(tmp_path, store):
    registration, _ = store
    local = Path(mlflow.artifacts.download_artifacts(registration["model_uri"], dst_path=tmp_path))
    check_model_code(local, registration["model_uri"])  # the project's own: accepted
    code, mlmodel = local / "classifier_model.py", local / "MLmodel"
    original = code.read_text()
    code.write_text(original + "\nimport os  # anything at all\n")
    with pytest.raises(ModelRequestError, match="loading it would run that code"):
        check_model_code(local, registration["model_uri"])
    code.write_text(original)
    for text in (mlmodel.read_text().replace("mlflow.pyfunc.loaders.code_model", "os"), "[1]"):
        mlmodel.write_text(text)
        with pytest.raises(ModelRequestError, match="loading it would run that code"):
            check_model_code(local, registration["model_uri"])


def test_a_deployment_reads_images_only_inside_the_project(tmp_path):
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "images").mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(png_bytes(np.zeros((4, 4, 1), np.uint8)))
    (project / "images" / "ok.png").write_bytes(secret.read_bytes())
    (project / "images" / "link.png").symlink_to(secret)
    for images in (str(outside), "../outside", str(secret)):
        with pytest.raises(ModelRequestError, match="only inside the project"):
            find_images(images, within=project)
    files = find_images(str(project / "images"), within=project)
    assert [f.name for f in files] == ["link.png", "ok.png"]
    assert read_image(files[0], within=project).startswith("a link to a file outside")
    assert not isinstance(read_image(files[1], within=project), str)
