"""The fast model server: a version's ONNX export behind an ASGI app (FastAPI on uvicorn).

MLflow's scoring server spends ~10 ms of a batch-1 request and ~240 ms of a batch of 32
parsing JSON into pandas and building a DataFrame of dicts, around a model that answers
in 0.05 ms through ONNX Runtime (BENCHMARKS.md, section 6). This app speaks the same
protocol to clients (POST /invocations with MLflow's tensor JSON, ``{"inputs": ...}`` or
``{"instances": ...}``; answers ``{"predictions": [{label, class_index, score,
probabilities}, ...]}``; errors as ``{"error_code", "message"}`` with 400) and runs the
file the export stage wrote and proved equal to the registered model (exports/parity.json:
probabilities within 1e-4, every top-1 label the same). It also takes image files: a PNG or
JPEG body (Content-Type image/png or image/jpeg), or a batch of them as TF Serving's
binary JSON, ``{"instances": [{"b64": "<base64 file>"}, ...]}``, decoded and resized with
DALI exactly as batch prediction decodes files (tasks/images/decode.py).

Requests are answered one at a time on the event loop: inference takes well under a
millisecond, and a thread hop would cost more than it. ONNX Runtime uses its default
threads (the physical cores) within a request.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.images import decode

IMAGE_TYPES = ("image/png", "image/jpeg")
JSON_TYPE = "application/json"
TENSOR_KEYS = ("inputs", "instances")  # MLflow's tensor formats (TF Serving's columns/rows)
TABLE_KEYS = ("dataframe_split", "dataframe_records")


class BadRequest(ValueError):
    """Input this model cannot answer: HTTP 400 with the message."""

    def answer(self) -> bytes:
        """MLflow's error JSON for it."""
        import orjson

        return orjson.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": str(self)})


def media_type(content_type: str) -> str:
    """``image/png`` of ``Image/PNG; charset=...``."""
    return content_type.split(";")[0].strip().lower()


@dataclass
class OnnxImageClassifier:
    """An exported image classifier: raw 0..255 pixels in, probabilities by class out."""

    path: Path
    class_names: list[str]
    session: Any = field(init=False, repr=False)
    input_name: str = field(init=False)
    image_shape: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(
            str(self.path), providers=["CPUExecutionProvider"]
        )
        [source] = self.session.get_inputs()
        self.input_name = source.name
        self.image_shape = tuple(int(d) for d in source.shape[1:])

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]

    def rows(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """The registered pyfunc's answer rows (tasks/serving/classifier_model.py)."""
        probabilities = self.probabilities(pixels).astype("float64")
        top = probabilities.argmax(axis=1)
        names = self.class_names
        return [
            {
                "label": names[index],
                "class_index": index,
                "score": row[index],
                "probabilities": dict(zip(names, row, strict=True)),
            }
            for index, row in zip(top.tolist(), probabilities.tolist(), strict=True)
        ]


def expected_shape(shape: tuple[int, ...]) -> str:
    return "(N, " + ", ".join(map(str, shape)) + ")"


def pixel_batch(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A JSON tensor as a float32 NHWC batch of 0..255 pixels, or BadRequest saying why
    not: the rules and messages of the registered pyfunc's as_pixel_batch
    (tasks/serving/classifier_model.py), which cannot be imported here: that file is model
    code that stands alone and registers itself with MLflow when imported."""
    expected = expected_shape(shape)
    try:
        pixels = np.asarray(value)
    except ValueError:  # ragged nesting
        raise BadRequest(f"expected images of shape {expected} (NHWC), got ragged lists") from None
    if pixels.ndim != len(shape) + 1 or tuple(pixels.shape[1:]) != shape:
        raise BadRequest(f"expected images of shape {expected} (NHWC), got shape {pixels.shape}")
    if pixels.shape[0] == 0:
        raise BadRequest(f"the batch is empty: send at least one image of shape {expected[4:-1]}")
    if pixels.dtype == bool or not np.issubdtype(pixels.dtype, np.number):
        raise BadRequest(f"expected numeric pixels (uint8 or float32, 0..255), got {pixels.dtype}")
    pixels = pixels.astype("float32")
    if not np.isfinite(pixels).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(pixels))[:, 0]})[:10]
        raise BadRequest(f"images {bad} contain NaN or infinite values: pixels must be 0..255")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 255:
        raise BadRequest(
            f"pixels must be raw values in 0..255, got {low:g}..{high:g} "
            "(send the image's pixels as they are, not normalized)"
        )
    return pixels


def json_tensor(document: Any) -> Any:
    """The tensor of an MLflow JSON request, or BadRequest naming the accepted forms."""
    if isinstance(document, dict):
        if any(key in document for key in TABLE_KEYS):
            raise BadRequest(
                'expected a tensor of raw pixels, got a table: send JSON {"inputs": [[[[p, ...], '
                "...], ...]]} (or instances)"
            )
        found = [key for key in TENSOR_KEYS if key in document]
        if len(found) == 1 and set(document) <= {found[0], "params"}:
            return document[found[0]]
    raise BadRequest('send {"inputs": <pixels>} or {"instances": <pixels>} (MLflow tensor JSON)')


def encoded_images(files: list[bytes]) -> list[decode.EncodedImage]:
    """Each file's header checked (PNG or JPEG, sane size) before DALI sees it."""
    checked = []
    for index, data in enumerate(files):
        info = decode.image_info(data)
        if isinstance(info, str):
            raise BadRequest(f"image {index}: {info}")
        checked.append(decode.EncodedImage(data, info))
    return checked


def b64_files(instances: Any) -> list[bytes] | None:
    """TF Serving's binary JSON (``[{"b64": ...}, ...]``) as bytes, or None if it is not."""
    if not (isinstance(instances, list) and instances and isinstance(instances[0], dict)):
        return None
    files = []
    for index, item in enumerate(instances):
        if not (isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str)):
            raise BadRequest(f'instance {index}: expected {{"b64": "<base64 PNG or JPEG>"}}')
        try:
            files.append(base64.b64decode(item["b64"], validate=True))
        except binascii.Error:
            raise BadRequest(f"instance {index}: not valid base64") from None
    return files


class ImageInput:
    """PNG/JPEG files to the model's pixels with DALI's CPU decoder (one per server)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.decoder = decode.Decoder(shape, device="cpu")

    def pixels(self, files: list[bytes]) -> np.ndarray:
        decoded = self.decoder.decode(encoded_images(files))
        failed = [(i, result) for i, result in enumerate(decoded) if isinstance(result, str)]
        if failed:
            index, reason = failed[0]
            raise BadRequest(f"image {index}: {reason}")
        return np.stack(decoded).astype("float32")


def build_app(model: OnnxImageClassifier, model_uri: str, max_batch: int) -> Any:
    """The ASGI app: /invocations, the liveness probes (/ping, /health) and /version."""
    import onnxruntime
    import orjson
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    images = ImageInput(model.image_shape)
    about = orjson.dumps({"model": model_uri, "runtime": f"onnxruntime {onnxruntime.__version__}"})

    def json_response(content: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(content), status_code=status, media_type=JSON_TYPE)

    async def alive(request: Any) -> Response:
        return Response(b"\n", media_type="text/plain")

    async def version(request: Any) -> Response:
        return Response(about, media_type=JSON_TYPE)

    async def invocations(request: Any) -> Response:
        kind = media_type(request.headers.get("content-type", ""))
        body = await request.body()
        try:
            pixels = image_pixels(kind, body, images, model.image_shape, max_batch)
            if pixels is None:
                try:
                    tensor = json_tensor(orjson.loads(body))
                except orjson.JSONDecodeError:
                    raise BadRequest("the body is not JSON") from None
                pixels = pixel_batch(tensor, model.image_shape)
        except BadRequest as error:
            return Response(error.answer(), status_code=400, media_type=JSON_TYPE)
        return json_response({"predictions": model.rows(pixels)})

    # Plain Starlette routes: the request as it is, no FastAPI parameter parsing per call.
    app.add_route("/ping", alive, methods=["GET"])
    app.add_route("/health", alive, methods=["GET"])
    app.add_route("/version", version, methods=["GET"])
    app.add_route("/invocations", invocations, methods=["POST"])
    return app


def image_pixels(
    kind: str, body: bytes, images: ImageInput, shape: tuple[int, ...], max_batch: int
) -> np.ndarray | None:
    """The pixels of an image-file request (a PNG/JPEG body, or TF Serving's b64 JSON);
    None for any other request (JSON pixels, or not an image request at all)."""
    import orjson

    if kind in IMAGE_TYPES:
        return images.pixels([body])
    if b'"b64"' not in body:
        return None
    try:
        files = b64_files(json_tensor(orjson.loads(body)))
    except orjson.JSONDecodeError:
        return None  # the app's own parser answers it
    if files is None:
        return None
    if len(files) > max_batch:
        raise BadRequest(f"{len(files)} images: send at most {max_batch} at a time")
    return images.pixels(files)


class ImageFilesAsTensors:
    """ASGI middleware for MLflow's scoring app: an image-file request (see image_pixels)
    is decoded with DALI and passed on as the tensor JSON that app takes, so both runtimes
    of `make serve-model` take files; everything else passes through untouched."""

    def __init__(self, app: Any, shape: tuple[int, int, int], max_batch: int) -> None:
        self.app, self.shape, self.max_batch = app, shape, max_batch
        self.images = ImageInput(shape)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was whole: nothing to answer
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        heads = {key.lower(): value for key, value in scope["headers"]}
        kind = media_type(heads.get(b"content-type", b"").decode("latin-1"))
        try:
            pixels = image_pixels(kind, body, self.images, self.shape, self.max_batch)
        except BadRequest as error:
            answer = error.answer()
            head = [(b"content-type", JSON_TYPE.encode()), (b"content-length", b"%d" % len(answer))]
            await send({"type": "http.response.start", "status": 400, "headers": head})
            await send({"type": "http.response.body", "body": answer})
            return
        if pixels is not None:
            import orjson

            body = orjson.dumps({"inputs": pixels.astype("uint8").tolist()})
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in TENSOR_HEADERS]
            headers += [
                (b"content-type", JSON_TYPE.encode()),
                (b"content-length", b"%d" % len(body)),
            ]
            scope = dict(scope, headers=headers)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()  # the client's disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


TENSOR_HEADERS = (b"content-type", b"content-length")
