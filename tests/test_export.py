"""The export stage on a real registered model: every format answers like the Keras model
in its own runtime, the registry lists each file, and bad cases fail before any work or
leave the previous exports in place."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from tasks.errors import ExportError
from tasks.prepared import load_split
from tasks.serving import formats
from tasks.stages import export
from tasks.workspace import read_json

pytestmark = pytest.mark.slow
FLOAT_VARIANTS = ("saved_model", "litert_fp32", "onnx")
QUANTIZED_VARIANTS = ("litert_dynamic", "litert_int8")


def test_float_formats_match_keras_and_quantized_ones_report_accuracy(served_pipeline):
    _, ws, registration = served_pipeline
    parity = read_json(ws.parity)
    assert parity["model"] == registration["model_uri"]
    assert parity["samples"] == 300 and parity["unsupported"] == {}
    assert set(parity["formats"]) == set(FLOAT_VARIANTS + QUANTIZED_VARIANTS)
    for variant in FLOAT_VARIANTS:
        row = parity["formats"][variant]
        assert row["max_abs_diff"] <= export.PARITY_BOUND, variant
        assert row["top1_agreement"] == 1.0, variant
        assert row["accuracy"] == pytest.approx(parity["keras"]["accuracy"]), variant
    for variant in QUANTIZED_VARIANTS:
        row = parity["formats"][variant]
        assert row["quantized"] and 0.0 <= row["accuracy"] <= 1.0
        assert row["accuracy_delta"] == pytest.approx(row["accuracy"] - parity["keras"]["accuracy"])
        assert 0 < row["bytes"] < parity["formats"]["litert_fp32"]["bytes"]  # int8 weights


def test_exports_load_in_their_own_runtimes_without_this_repository(served_pipeline):
    """Recomputed here from the files: the SavedModel's two signatures, LiteRT's interpreter
    and ONNX Runtime against the registered pyfunc model's probabilities."""
    import tensorflow as tf

    cfg, ws, registration = served_pipeline
    images, _ = load_split(ws.prepared, "test")
    batch = images[:16]
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    served = mlflow.pyfunc.load_model(registration["model_uri"]).predict(batch.astype("float32"))
    expected = np.array([list(row.values()) for row in served["probabilities"]])

    loaded = tf.saved_model.load(str(ws.exports / "saved_model"))
    as_float = loaded.signatures["serving_default"](pixels=tf.constant(batch, tf.float32))
    as_uint8 = loaded.signatures["serve_uint8"](pixels=tf.constant(batch))
    np.testing.assert_allclose(as_float["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(as_uint8["probabilities"].numpy(), as_float["probabilities"])
    for file, runner in (("model_fp32.tflite", "litert"), ("model.onnx", "onnx")):
        answers = formats.RUNNERS[runner](ws.exports / file)(batch.astype("float32"))
        np.testing.assert_allclose(answers, expected, atol=1e-5, err_msg=file)
    int8 = formats.RUNNERS["litert"](ws.exports / "model_int8.tflite")(batch)  # uint8 input
    assert int8.shape == expected.shape and np.allclose(int8.sum(axis=1), 1.0, atol=0.05)


def test_the_model_version_lists_every_export_with_its_parity(served_pipeline):
    cfg, ws, registration = served_pipeline
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    version = client.get_model_version(registration["model_name"], registration["version"])
    parity = read_json(ws.parity)
    exports = version.description.split("**Exports**")[1]
    for variant, row in parity["formats"].items():
        artifact = f"runs:/{registration['run_id']}/exports/{row['file']}"
        assert f"- {variant}: `{artifact}` ({row['bytes']} bytes)" in exports, exports
        assert f"{row['max_abs_diff']:.2g}" in exports
    run = client.get_run(registration["run_id"])
    assert run.info.status == "FINISHED"
    assert parity["formats"]["onnx"]["max_abs_diff"] <= export.PARITY_BOUND
    assert not [key for key in run.data.metrics if "onnx" in key], "numbers in the listing"
    logged = {item.path for item in client.list_artifacts(registration["run_id"], "exports")}
    assert {"exports/model.onnx", "exports/model_int8.tflite", "exports/parity.json"} <= logged


def test_a_missing_converter_is_named_before_any_work(served_pipeline, monkeypatch):
    cfg, ws, _ = served_pipeline
    before = ws.parity.read_bytes()
    monkeypatch.setitem(formats.CONVERTERS, "onnx", [("tf2onnx_not_installed", "tf2onnx")])
    with pytest.raises(ExportError, match=r"format 'onnx' needs the package 'tf2onnx'"):
        export.run(cfg, ws)
    assert ws.parity.read_bytes() == before


def test_a_parity_failure_names_the_format_and_keeps_the_previous_exports(
    served_pipeline, monkeypatch
):
    """With a bound no real export can meet, the stage fails with each float format's
    numbers, and exports/ is the previous one, whole."""
    cfg, ws, registration = served_pipeline
    before = {path.name: path.read_bytes() for path in ws.exports.iterdir() if path.is_file()}
    monkeypatch.setattr(export, "PARITY_BOUND", -1.0)
    with pytest.raises(ExportError) as failed:
        export.export(cfg, ws, registration["model_name"], registration["version"])
    message = str(failed.value)
    for variant in FLOAT_VARIANTS:
        assert f"{variant}: max |p - p_keras| = " in message
    assert "litert_int8" not in message  # quantized variants are reported, not judged
    after = {path.name: path.read_bytes() for path in ws.exports.iterdir() if path.is_file()}
    assert after == before
    assert not list(ws.root.glob(".exports.*"))


def test_export_without_a_registration_says_what_to_run(tiny_cfg, workspace):
    with pytest.raises(ExportError, match=r"registration.json not found.*dvc repro register"):
        export.run(tiny_cfg, workspace)


def test_fast_cnn_with_exact_gelu_converts_to_onnx(tmp_path):
    """TensorFlow writes exact GELU with Erfc, an op ONNX lacks; the converter's handler
    rewrites it (1 - Erf) and ONNX Runtime answers like the SavedModel."""
    from tasks.models.cnn import fast_cnn
    from tasks.models.wrap import with_normalization

    model = formats.probabilities_model(
        with_normalization(fast_cnn((28, 28, 1), 10, (8, 16, 16)), [33.0], [70.0])
    )
    formats.write_saved_model(model, tmp_path / "saved_model")
    formats.convert_onnx(tmp_path / "saved_model", tmp_path / "model.onnx")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1)).astype("float32")
    expected = formats.RUNNERS["saved_model"](tmp_path / "saved_model")(pixels)
    answers = formats.RUNNERS["onnx"](tmp_path / "model.onnx")(pixels)
    assert np.abs(answers - expected).max() <= export.PARITY_BOUND
