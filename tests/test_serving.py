"""The registered model served for real: `mlflow models serve` (the issue's command) and
`python -m flows.serve_model` behind the stack's credential, with both its runtimes (MLflow's
own app on the pyfunc; the version's ONNX export behind tasks/serving/onnx_app.py), on free
loopback ports, answering with class names and probabilities; bad input gets HTTP 400
with a JSON message, never a stack trace."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tasks.prepared import load_split
from tests.helpers.operate import free_port
from tests.helpers.project import REPO, module_command, pipeline_env

pytestmark = pytest.mark.slow
STARTUP_S = 180  # ~7 s here when idle


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_line(process: subprocess.Popen, text: str) -> None:
    """Read the server's output until a line holds ``text`` (it ends, or prints it)."""
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"the server ended without printing {text!r}")


@contextmanager
def server(
    command: list[str], port: int, env: dict[str, str], cwd: Path, banner: str | None = None
) -> Iterator[str]:
    """Start ``command``, wait for /ping on ``port`` (or, given ``banner``, only for that
    line: a user's client starts when the server says so), yield the base URL, stop it."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        if banner is not None:
            wait_for_line(process, banner)
        deadline = time.monotonic() + STARTUP_S
        while banner is None:
            assert process.poll() is None, process.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "model server did not start"
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(served_pipeline):
    cfg, ws, registration = served_pipeline
    images, _ = load_split(ws.prepared, "test")
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    expected = mlflow.pyfunc.load_model(registration["model_uri"]).predict(
        images[:8].astype("float32")
    )
    env = pipeline_env() | {"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    return registration["model_uri"], images, expected, env


def bad_requests(shape: tuple[int, ...]) -> dict[str, bytes]:
    good = np.zeros((1, *shape)).tolist()
    return {
        "wrong shape": json.dumps({"inputs": np.zeros((1, 5, 5, 3)).tolist()}).encode(),
        "NaN": json.dumps({"inputs": np.full((1, *shape), np.nan).tolist()}).encode(),
        "outside 0..255": json.dumps({"inputs": (np.ones((1, *shape)) * 300).tolist()}).encode(),
        "empty batch": json.dumps({"inputs": np.zeros((0, *shape)).tolist()}).encode(),
        "strings": json.dumps({"inputs": [[["a"] * shape[1]] * shape[0]]}).encode(),
        "not JSON": b"pixels please",
        "a table": json.dumps({"dataframe_records": [{"x": 1}]}).encode(),
        "good": json.dumps({"inputs": good}).encode(),  # the control: answered 200
    }


def check_answers(
    base: str, served, headers: dict[str, str] | None = None, atol: float = 1e-6
) -> None:
    """The registered pyfunc's answers for 8 test images (within ``atol``: an export answers
    within the export stage's parity bound), then 400 for each bad request."""
    uri, images, expected, _ = served
    body = json.dumps({"inputs": images[:8].tolist()}).encode()  # uint8 values as JSON numbers
    status, answer = post(f"{base}/invocations", body, headers)
    assert status == 200, answer
    rows = answer["predictions"]
    assert [row["label"] for row in rows] == list(expected["label"])
    assert [row["class_index"] for row in rows] == list(expected["class_index"])
    for row, probabilities in zip(rows, expected["probabilities"], strict=True):
        assert list(row["probabilities"]) == [f"class_{i}" for i in range(10)]
        np.testing.assert_allclose(
            list(row["probabilities"].values()), list(probabilities.values()), atol=atol
        )
    for what, request in bad_requests(images.shape[1:]).items():
        status, answer = post(f"{base}/invocations", request, headers)
        if what == "good":
            assert status == 200, answer
            continue
        assert status == 400, (what, status, answer)
        assert answer["message"], what
        assert "Traceback" not in json.dumps(answer) and "stack_trace" not in answer, what


def test_mlflow_models_serve_answers_with_names_and_refuses_bad_input(served):
    port = free_port()
    command = module_command(
        "mlflow", "models", "serve", "-m", served[0],
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    )  # fmt: skip
    with server(command, port, served[3], REPO) as base:
        check_answers(base, served)
        _, answer = post(f"{base}/invocations", bad_requests((28, 28, 1))["outside 0..255"])
        assert "pixels must be raw values in 0..255" in answer["message"]


def test_serve_model_requires_the_credential(served, tmp_path):
    port = free_port()
    credential = f"pipeline:{secrets.token_urlsafe(24)}"
    env = served[3] | {"PREFECT_SERVER_API_AUTH_STRING": credential, "PYTHONPATH": str(REPO)}
    command = module_command("flows.serve_model", served[0], "--port", str(port))
    command += ["--runtime", "mlflow"]
    with server(command, port, env, tmp_path) as base:
        body = bad_requests((28, 28, 1))["good"]
        assert post(f"{base}/invocations", body)[0] == 401
        wrong = {"Authorization": "Basic " + base64.b64encode(b"pipeline:guess").decode()}
        assert post(f"{base}/invocations", body, wrong)[0] == 401
        right = {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}
        check_answers(base, served, right)
        check_guards(port, right)
        check_files(base, served, right)
    stored = tmp_path / ".pipeline" / "secrets" / "api-credential"
    assert stored.read_text().strip() == credential and (stored.stat().st_mode & 0o077) == 0


def png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(encoded, "PNG")
    return encoded.getvalue()


def check_files(base: str, served, credential: dict[str, str]) -> None:
    """Image files, decoded by DALI as batch prediction decodes them: PNG is lossless, so
    each answer is the one for the same pixels sent as JSON; a broken file is a 400."""
    _, images, expected, _ = served
    files = [png(image) for image in images[:3]]
    as_png = credential | {"Content-Type": "image/png"}
    status, answer = post(f"{base}/invocations", files[0], as_png)
    assert status == 200, answer
    [row] = answer["predictions"]
    assert row["label"] == expected["label"][0]
    batch = {"instances": [{"b64": base64.b64encode(f).decode()} for f in files]}
    status, answer = post(f"{base}/invocations", json.dumps(batch).encode(), credential)
    assert status == 200, answer
    assert [r["label"] for r in answer["predictions"]] == list(expected["label"][:3])
    first = answer["predictions"][0]
    assert first["label"] == row["label"]  # and the same numbers (as a batch: within float error)
    np.testing.assert_allclose(
        list(first["probabilities"].values()), list(row["probabilities"].values()), atol=1e-6
    )
    status, answer = post(f"{base}/invocations", files[0][:60], as_png)
    assert status == 400 and "image 0: DALI could not decode it" in answer["message"], answer
    not_b64 = json.dumps({"instances": [{"b64": "%%%"}]}).encode()
    status, answer = post(f"{base}/invocations", not_b64, credential)
    assert (status, answer["message"]) == (400, "instance 0: not valid base64"), answer


def test_the_onnx_runtime_answers_like_the_registered_model_and_takes_image_files(served, tmp_path):
    """`make serve-model`'s default on a version with an ONNX export: the export in ONNX
    Runtime, the same protocol, credential and guards as MLflow's app; PNG files too."""
    uri, images, expected, env = served
    port = free_port()
    credential = f"pipeline:{secrets.token_urlsafe(24)}"
    env = env | {"PREFECT_SERVER_API_AUTH_STRING": credential, "PYTHONPATH": str(REPO)}
    command = module_command("flows.serve_model", uri, "--port", str(port))
    right = {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}
    with server(command, port, env, tmp_path, banner=f"serving {uri} ") as base:
        # Listening the moment it says so: no retry (the README's curl right after the banner).
        with urllib.request.urlopen(f"{base}/ping", timeout=STARTUP_S) as answer:
            assert answer.status == 200
        assert post(f"{base}/invocations", bad_requests((28, 28, 1))["good"])[0] == 401
        # A second server on the same port stops at once, naming the port and the fix.
        taken = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert taken.returncode == 2, taken.stderr[-3000:]
        assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr and "--port" in taken.stderr
        assert "serving" not in taken.stdout
        check_answers(base, served, right, atol=1e-4)  # the export stage's parity bound
        check_guards(port, right)
        request = urllib.request.Request(f"{base}/version", headers=right)
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read())["runtime"].startswith("onnxruntime ")
        check_files(base, served, right)


def test_the_onnx_runtime_names_the_fix_for_a_version_without_an_onnx_export(served, tmp_path):
    """The same model files registered from a run that exported nothing: `--runtime onnx`
    stops before serving, naming the export and the other runtime; `auto` falls back."""
    from flows.serve_model import load_onnx_app
    from tasks.errors import ModelRequestError

    uri, _, _, env = served
    store = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    name, version = uri.removeprefix("models:/").split("/")
    registered = client.get_model_version(name, version)
    bare_run = client.create_run(client.get_run(registered.run_id).info.experiment_id)
    client.set_terminated(bare_run.info.run_id)
    copy = client.create_model_version(name, registered.source, run_id=bare_run.info.run_id)
    copy_uri = f"models:/{name}/{copy.version}"
    try:
        with pytest.raises(ModelRequestError, match=r"has no ONNX export .*--runtime mlflow"):
            load_onnx_app(copy_uri, store, tmp_path / "required", required=True)
        assert load_onnx_app(copy_uri, store, tmp_path / "auto", required=False) is None
    finally:  # the shared registry as the other tests expect it
        client.delete_model_version(name, copy.version)
        client.delete_run(bare_run.info.run_id)


def raw_post(port: int, head: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """A POST whose headers say what the test wants (a length the body does not have,
    chunked encoding), answered before the body is read."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", "/invocations")
    for key, value in head.items():
        connection.putheader(key, value)
    connection.endheaders(body or None)
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read())


def check_guards(port: int, credential: dict[str, str]) -> None:
    """The requests that used to get a 500, a stack trace or no limit (issue: reliability)."""
    base = f"http://127.0.0.1:{port}"
    answers = []
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = post(f"{base}/invocations", deep, credential)
    assert status == 400 and "nests deeper than" in answer["message"], (status, answer)
    answers.append(answer)
    status, answer = post(
        f"{base}/invocations", b"a,b\n1,2\n", credential | {"Content-Type": "text/csv"}
    )
    assert status == 415 and "application/json" in answer["message"], (status, answer)
    answers.append(answer)
    huge = {"Content-Type": "application/json", "Content-Length": str(64 * 2**20)}
    status, answer = raw_post(port, credential | huge)
    assert status == 413 and "at most 8000000" in answer["message"], (status, answer)
    answers.append(answer)
    chunked = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    status, answer = raw_post(port, credential | chunked, b"2\r\n{}\r\n0\r\n\r\n")
    assert status == 411, (status, answer)
    answers.append(answer)
    said = json.dumps(answers)
    assert "stack_trace" not in said and "Traceback" not in said and "/tmp" not in said


def test_the_guard_hides_internals_and_numbers_unexpected_errors(caplog):
    """On an app of its own: an exception becomes a 500 with an incident id (the traceback
    only in the log), and a 4xx JSON answer loses its stack_trace."""
    import asyncio

    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from flows.serve_model import guard_requests

    app = FastAPI()

    @app.post("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals at /srv/model/code.py")

    @app.post("/refuse")
    async def refuse() -> JSONResponse:
        return JSONResponse({"message": "bad", "stack_trace": "File /srv/x.py"}, 400)

    guard_requests(app, 1000)

    async def post_to(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://model") as client:
            return await client.post(path, json={"inputs": [1]})

    answer = asyncio.run(post_to("/boom"))
    assert answer.status_code == 500
    assert answer.json()["error_code"] == "INTERNAL_ERROR" and "/srv" not in answer.text
    incident = answer.json()["message"].split()[2].rstrip(":")
    assert incident in caplog.text and "secret internals" in caplog.text
    answer = asyncio.run(post_to("/refuse"))
    assert answer.status_code == 400 and answer.json() == {"message": "bad"}


def test_json_depth_counts_nesting_not_size():
    from flows.serve_model import json_depth

    assert json_depth(b'{"inputs": [[[[1, 2]]]]}') == 5
    assert json_depth(b"[1, 2, 3]" * 1000) == 1
    assert json_depth(b"[" * 50 + b"]" * 50) == 50
    assert json_depth(b"12") == 0


def test_serve_model_refuses_a_malformed_uri_before_loading(served, tmp_path):
    env = served[3] | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        module_command("flows.serve_model", "runs:/abc/model"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "is not a model URI: expected models:/<name>/<version>" in done.stderr
    assert "Traceback" not in done.stderr
