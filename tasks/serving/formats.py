"""One exporter and one runner per serving format: the seam where formats differ.

Every format starts from the same SavedModel (a Keras ExportArchive of the raw-pixel
model with a softmax on top), so LiteRT and ONNX convert exactly what TF Serving would
serve. A runner loads an exported file with the runtime users deploy it with
(tf.saved_model, LiteRT's interpreter, ONNX Runtime) and returns float32 probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from tasks import startup
from tasks.errors import ExportError

SIGNATURE = "serving_default"  # float32 pixels (token ids: int32); "serve_uint8" takes uint8
INPUT_NAME = "pixels"  # an image model's input; a language model's is "tokens"
OUTPUT_NAME = "probabilities"
ONNX_OPSET = 17  # ONNX Runtime 1.32 and TensorRT 10's parser both read it
REPRESENTATIVE_IMAGES = 200  # training images that calibrate the int8 ranges

# format -> (module it imports, the pip package that provides it)
CONVERTERS: dict[str, list[tuple[str, str]]] = {
    "saved_model": [],
    "litert": [("ai_edge_litert", "ai-edge-litert")],
    "onnx": [("tf2onnx", "tf2onnx"), ("onnxruntime", "onnxruntime")],
}


@dataclass(frozen=True)
class Exported:
    """One exported file (or SavedModel directory) under exports/."""

    variant: str  # saved_model | litert_fp32 | litert_dynamic | litert_int8 | onnx
    file: str  # relative to the exports directory
    runner: str  # key of RUNNERS
    quantized: bool


def check_converters(formats: list[str]) -> None:
    """Fail before any work when a format's converter or runtime is not installed."""
    for fmt in formats:
        for module, package in CONVERTERS[fmt]:
            if find_spec(module) is None:
                raise ExportError(
                    f"export format {fmt!r} needs the package {package!r}, which is not "
                    f"installed: `pip install -c requirements.lock {package}` (or drop "
                    f"{fmt!r} from export.formats)"
                )


def probabilities_model(raw_model: Any) -> Any:
    """The raw-pixel model with a softmax on top: exports answer with probabilities."""
    import keras

    probabilities = keras.layers.Softmax(name=OUTPUT_NAME, dtype="float32")(raw_model.output)
    return keras.Model(raw_model.input, probabilities, name="classifier")


def write_saved_model(model: Any, out_dir: Path) -> None:
    """A SavedModel for TF Serving / tf.saved_model.load: ``serving_default`` takes the
    model's input, any batch: float32 pixels (0..255, NHWC) and, as ``serve_uint8``, the
    same as uint8; or int32 token ids (a language model's context)."""
    import keras
    import tensorflow as tf

    shape = (None, *model.input_shape[1:])
    dtype = tf.as_dtype(model.inputs[0].dtype)
    name = input_name(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(  # the first endpoint is also serving_default
        name="serve",
        fn=lambda x: {OUTPUT_NAME: model(x, training=False)},
        input_signature=[tf.TensorSpec(shape, dtype, name=name)],
    )
    if dtype.is_floating:
        archive.add_endpoint(
            name="serve_uint8",
            fn=lambda x: {OUTPUT_NAME: model(tf.cast(x, dtype), training=False)},
            input_signature=[tf.TensorSpec(shape, tf.uint8, name=name)],
        )
    archive.write_out(str(out_dir), verbose=False)


def input_name(model: Any) -> str:
    """The exported input's name: "pixels" for an image model, "tokens" for text."""
    return "tokens" if "int" in str(model.inputs[0].dtype) else INPUT_NAME


def litert_variants(quantize: str) -> list[str]:
    return {"none": ["fp32"], "dynamic": ["fp32", "dynamic"], "int8": ["fp32", "dynamic", "int8"]}[
        quantize
    ]


# What the LiteRT converter and interpreter print to file descriptor 2 on a successful
# conversion (TF 2.21, ai-edge-litert 2.3): calibration settings, the CPU delegate, and
# the LSTM's failed attempt to lower TensorList ops, which the caller reports as
# `unsupported` with the converter's own exception. None is something a user acts on.
LITERT_CHATTER = (
    "fully_quantize:",
    "Created TensorFlow Lite XNNPACK delegate",
    "Lowering tensor list ops",
    "TF Select ops:",
    "tf.TensorList",
)


def without_litert_chatter(line: str) -> bool:
    return any(text in line for text in LITERT_CHATTER)


def convert_litert(saved_model: Path, variant: str, representative: np.ndarray) -> bytes:
    """LiteRT flatbuffer: fp32, dynamic-range (int8 weights), or full integer (int8 ops,
    uint8 raw-pixel input, float32 probabilities out), calibrated on ``representative``."""
    with startup.routed_stderr_lines(without_litert_chatter):
        return _convert_litert(saved_model, variant, representative)


def _convert_litert(saved_model: Path, variant: str, representative: np.ndarray) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), [SIGNATURE])
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "int8":

        def calibration() -> Iterator[list[np.ndarray]]:
            for example in representative:  # images as float32, token ids as they are
                batch = example[None]
                yield [batch.astype("float32") if batch.dtype == np.uint8 else batch]

        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if representative.dtype == np.uint8:
            converter.inference_input_type = tf.uint8  # raw pixels: scale 1, zero point 0
    return converter.convert()


def convert_onnx(saved_model: Path, target: Path) -> None:
    """ONNX through tf2onnx, from the SavedModel's signature (Keras' own ONNX export turns
    the normalization constants into extra inputs). TensorFlow's exact GELU (fast_cnn)
    becomes Erfc, which ONNX lacks: it is written as 1 - Erf."""
    from tf2onnx import convert, tf_loader

    quiet = [logging.getLogger(name) for name in ("tensorflow", "tf2onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # TF1-API deprecation notices and per-step INFO lines
        logger.setLevel(logging.ERROR)
    try:
        graph_def, inputs, outputs, _, renames = tf_loader.from_saved_model(
            str(saved_model),
            None,
            None,
            signatures=[SIGNATURE],
            return_initialized_tables=True,
            return_tensors_to_rename=True,
        )
        convert.from_graph_def(
            graph_def,
            input_names=inputs,
            output_names=outputs,
            opset=ONNX_OPSET,
            custom_op_handlers={"Erfc": (erfc_as_one_minus_erf, [])},
            tensors_to_rename=renames,
            output_path=str(target),
        )
    except Exception as error:  # the converter's own errors have no common type
        raise ExportError(f"tf2onnx could not convert {saved_model}: {error}") from error
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def erfc_as_one_minus_erf(ctx: Any, node: Any, name: str, args: list[Any]) -> Any:
    """A tf2onnx op handler: TensorFlow's Erfc as ONNX Sub(1, Erf(x))."""
    from tf2onnx import utils

    node.type = "Erf"
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1.0, np.float32))
    complement = ctx.insert_new_node_on_output(
        "Sub", node.output[0], name=utils.make_name(f"{node.name}_erfc")
    )
    ctx.replace_inputs(complement, [one.output[0], node.output[0]])
    return node


def write_formats(
    model: Any,
    out_dir: Path,
    scratch: Path,
    formats: list[str],
    quantize: str,
    representative: np.ndarray,
) -> tuple[list[Exported], dict[str, str]]:
    """Write every requested format into ``out_dir``; return them and the variants the
    converter could not make (variant -> reason), which are reported, not fatal."""
    source = out_dir / "saved_model" if "saved_model" in formats else scratch / "saved_model"
    write_saved_model(model, source)
    exported = []
    unsupported: dict[str, str] = {}
    if "saved_model" in formats:
        exported.append(Exported("saved_model", "saved_model", "saved_model", False))
    if "litert" in formats:
        for variant in litert_variants(quantize):
            name = f"model_{variant}.tflite"
            try:
                (out_dir / name).write_bytes(convert_litert(source, variant, representative))
            except Exception as error:  # the converter's own errors have no common type
                # An image model's float LiteRT file must exist; a quantized one, or any for
                # a language model (TFLite cannot lower a variable-batch LSTM's tensor
                # lists without TF ops), is reported as unsupported instead.
                if variant != "int8" and representative.dtype == np.uint8:
                    raise
                unsupported[f"litert_{variant}"] = f"{type(error).__name__}: {error}"[:500]
                continue
            exported.append(Exported(f"litert_{variant}", name, "litert", variant != "fp32"))
    if "onnx" in formats:
        convert_onnx(source, out_dir / "model.onnx")
        exported.append(Exported("onnx", "model.onnx", "onnx", False))
    return exported, unsupported


def run_saved_model(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    [(name, spec)] = serve.structured_input_signature[1].items()
    return lambda x: serve(**{name: tf.constant(x, spec.dtype)})[OUTPUT_NAME].numpy()


def run_litert(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    with startup.routed_stderr_lines(without_litert_chatter):
        interpreter = Interpreter(model_path=str(path))
    [source] = interpreter.get_input_details()
    [result] = interpreter.get_output_details()

    def predict(pixels: np.ndarray) -> np.ndarray:
        with startup.routed_stderr_lines(without_litert_chatter):  # the delegate's INFO line
            interpreter.resize_tensor_input(source["index"], pixels.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(source["index"], pixels.astype(source["dtype"]))
            interpreter.invoke()
        out = interpreter.get_tensor(result["index"])
        scale, zero = result["quantization"]
        return (out.astype("float32") - zero) * scale if scale else out.astype("float32")

    return predict


def run_onnx(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [source] = session.get_inputs()
    dtype = "int32" if source.type == "tensor(int32)" else "float32"
    return lambda x: session.run(None, {source.name: x.astype(dtype)})[0]


RUNNERS: dict[str, Callable[[Path], Callable[[np.ndarray], np.ndarray]]] = {
    "saved_model": run_saved_model,
    "litert": run_litert,
    "onnx": run_onnx,
}
