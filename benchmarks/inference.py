"""Inference on this CPU: one registered model in every export format and behind each HTTP
server the project ships, side by side.

The model comes from the real pipeline (`python -m flows.pipeline`, all six stages on
Fashion-MNIST, its MLflow store inside the work directory), or from a --workdir that
already holds one (exports/parity.json present). Then, each in its own process (one
runtime loaded; its peak RSS measured):

* ``keras``: the registered raw-pixel Keras model with a softmax on top
  (formats.probabilities_model), called with ``predict_on_batch``;
* ``keras_predict``: the same model through ``model.predict``, what the registered pyfunc
  (tasks/serving/classifier_model.py) calls for batches over 256 (one direct call below);
* each file the export stage wrote (exports/parity.json lists them), run by its runner in
  tasks/serving/formats.py: SavedModel, LiteRT fp32/dynamic/int8, ONNX Runtime (CPU);
* ``dali_decode_cpu``: DALI decoding the test images as JPEG uploads
  (benchmarks/inference_decode.py; its GPU twin, ``mixed``, is `--gpu`);
* ``http_*``: round trips at batch 1, 32 and 256 through `mlflow models serve` and
  `python -m flows.serve_model` with each runtime (MLflow's app; the ONNX app, with JSON
  pixels and with PNG files) (benchmarks/inference_http.py).

Per format: load time, batch-1 latency (p50/p99 over ``latency_calls`` calls after
warm-up, each on the next test image), images/s at batch 1/32/256 (median and spread over
``repeats`` windows of back-to-back calls), and accuracy plus top-1 agreement with
``keras`` on the whole test split. The 1-minute load average is recorded at the start and
the end of the measurement and around every row.

    python -m benchmarks.inference [--workdir DIR] [--quick]
    python -m benchmarks.inference --gpu --workdir DIR   # DALI mixed decoding; needs a GPU

Quick mode trains on a tiny synthetic 28x28x1 set for one epoch and makes few calls: it
checks the code, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import inference_decode, inference_http
from benchmarks.common import (
    REPO,
    as_cli_overrides,
    child_env,
    command,
    load_average,
    log,
    python_module,
    run_measured,
    stamp_row,
    write_rows,
)
from benchmarks.inference_formats import (
    BATCHES,
    THREADS,
    Sizes,
    Variant,
    format_worker,
    percentiles,
    variants,
)
from benchmarks.markdown import code, load, missing, ms, size, spread, table, verdict
from tasks import startup

TRAIN_OVERRIDES = {"data.source": "idx", "data.name": "fashion_mnist", "train.epochs": 3}
QUICK_OVERRIDES = {
    "data.source": "synthetic",
    "data.synthetic.image_size": 28,
    "data.synthetic.channels": 1,
    "data.synthetic.train_size": 1_500,
    "data.synthetic.test_size": 500,
    "train.epochs": 1,
    "preprocess.grid_samples": 16,
}
HTTP_BATCHES = (1, 32, 256)
HTTP_GOAL = {"batch1_p50_ms": 3.0, "batch32_images_per_s": 2000}  # the JSON format, with auth
RUNTIME_PACKAGES = ("onnxruntime", "ai-edge-litert", "tf2onnx", "onnx", "uvicorn", "pillow")
SIZES = {False: Sizes(20, 200, 5, 1.0, 200), True: Sizes(3, 20, 2, 0.2, 10)}


# ---------------------------------------------------------------------------- the model


def train_overrides(quick: bool) -> dict[str, Any]:
    return QUICK_OVERRIDES if quick else TRAIN_OVERRIDES


def pipeline_command(quick: bool) -> list[str]:
    """`python -m flows.pipeline` with the training overrides, except --workdir."""
    return ["python", "-m", "flows.pipeline", *as_cli_overrides(train_overrides(quick))]


def ensure_model(workdir: Path, quick: bool, scratch: Path) -> dict[str, Any]:
    """Train through the real pipeline into ``workdir`` unless it already has exports."""
    from tasks.workspace import Workspace, read_json

    ws = Workspace(workdir)
    trained = None
    if ws.parity.is_file() and ws.registration.is_file():
        log(f"reusing the model in {workdir}")
    else:
        cmd = [*pipeline_command(quick), "--workdir", str(workdir)]
        log(f"training: {shlex.join(cmd)}")
        measured = run_measured(
            [sys.executable, *cmd[1:]],
            cwd=REPO,
            env=child_env(scratch),
            log=scratch / "pipeline.log",
        )
        trained = {"wall_s": measured.wall_s, "peak_rss_mib": measured.peak_rss_mib}
    registration = read_json(ws.registration)
    meta = read_json(ws.prepared / "meta.json")
    return {
        "uri": registration["model_uri"],
        "name": registration["model_name"],
        "version": str(registration["version"]),
        "store": registration["mlflow"]["tracking_uri"],
        "test_accuracy_evaluate_stage": registration["test_accuracy"],
        "dataset": {"source": meta["source"], "name": meta["dataset"], "counts": meta["counts"]},
        "image_shape": meta["image_shape"],
        "trained_here": trained,
        "pipeline_command": shlex.join(pipeline_command(quick)) + ' --workdir "$(mktemp -d)"',
    }


def disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def registered_sizes(model: dict[str, Any]) -> dict[str, int]:
    """Bytes of the registered version: its .keras file, and the whole MLflow model
    directory `mlflow models serve` loads (model code, environment files, the .keras)."""
    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        mlflow.set_tracking_uri(model["store"])
        local = Path(mlflow.artifacts.download_artifacts(model["uri"], dst_path=scratch))
        [keras_file] = local.rglob("*.keras")
        return {"keras": disk_bytes(keras_file), "mlflow_model": disk_bytes(local)}


# ----------------------------------------------------------------------------- parent


def run_worker(args: list[str], scratch: Path, name: str) -> tuple[dict[str, Any], float]:
    """A worker process of this module; its result and its peak RSS (MiB)."""
    out = scratch / f"{name}.json"
    measured = run_measured(
        python_module("benchmarks.inference", *args, "--out", str(out)),
        cwd=REPO,
        env=child_env(scratch),
        log=scratch / f"{name}.log",
    )
    return json.loads(out.read_text()), measured.peak_rss_mib


def worker_args(workdir: Path, model_file: Path, quick: bool) -> list[str]:
    return ["--workdir", str(workdir), "--model-file", str(model_file)] + (
        ["--quick"] if quick else []
    )


def measure_format(
    variant: Variant,
    common_args: list[str],
    sizes: dict[str, int],
    workdir: Path,
    quick: bool,
    scratch: Path,
) -> dict[str, Any]:
    load_before = load_average()
    result, rss = run_worker(["--worker", variant.key, *common_args], scratch, variant.key)
    on_disk = (
        sizes["keras"] if variant.file is None else disk_bytes(workdir / "exports" / variant.file)
    )
    row = (
        asdict(variant)
        | result
        | {
            "threads": THREADS[variant.runtime],
            "bytes": on_disk,
            "peak_rss_mib": rss,
            "command": command("benchmarks.inference", quick=quick),
        }
    )
    log(
        f"{variant.key}: p50 {result['latency_ms_batch1']['p50']:.3f} ms, "
        f"{result['images_per_s']['256']['median']:,.0f} img/s at 256, "
        f"accuracy {result['accuracy']:.4f}"
    )
    return stamp_row(row, load_before)


def measure_decode(device: str, common_args: list[str], quick: bool, scratch: Path) -> dict:
    load_before = load_average()
    key = f"dali_decode_{device}"
    result, rss = run_worker(["--decode-worker", device, *common_args], scratch, key)
    gpu_flag = ["--gpu"] if device == "mixed" else []
    row = {"key": key, "runtime": "dali", **result, "peak_rss_mib": rss}
    row["command"] = command("benchmarks.inference", *gpu_flag, quick=quick)
    log(f"{key}: {result['images_per_s']['median']:,.0f} img/s")
    return stamp_row(row, load_before)


def measure_http(
    spec: inference_http.Server,
    model: dict[str, Any],
    keras_top1: np.ndarray,
    workdir: Path,
    quick: bool,
    scratch: Path,
    mlserver_venv: Path | None = None,
) -> dict[str, Any]:
    """One server's round trips at each batch size, with JSON pixels (and PNG files where
    it takes them)."""
    from tasks import prepared

    load_before = load_average()
    images, _ = prepared.load_split(workdir / "data" / "prepared", "test")
    server_args = (spec, model["uri"], model["store"], images[:1], scratch, mlserver_venv)
    with inference_http.model_server(*server_args) as server:
        log(f"{spec.key}: first answer {server['first_answer_s']:.1f} s after start")
        inputs = {"json": {}, "png": {}} if spec.files else {"json": {}}
        for name, batches in inputs.items():
            for batch in HTTP_BATCHES:
                calls = SIZES[quick].http_calls if batch < 256 else SIZES[quick].http_calls // 10
                done = inference_http.round_trips(
                    spec, server["port"], images, keras_top1, batch, calls, name == "png"
                )
                batches[str(batch)] = {"latency_ms": percentiles(done.pop("times_ms")), **done}
                rate = done["images_per_s_sequential"]
                log(f"{spec.key} {name} batch {batch}: {rate:,.0f} img/s")
        rss = inference_http.tree_rss_mib(server["pid"])
    row = {
        "key": spec.key,
        "runtime": "http",
        "threads": spec.threads,
        "server_command": spec.shown(model["uri"]),
        "credential": spec.credential,
        "first_answer_s": server["first_answer_s"],
        "server_rss_mib": rss,
        "inputs": inputs,
        "command": command("benchmarks.inference", *venv_args(mlserver_venv), quick=quick),
    }
    return stamp_row(row, load_before)


def venv_args(mlserver_venv: Path | None) -> list[str]:
    return ["--mlserver-venv", str(mlserver_venv)] if mlserver_venv else []


def gpu_commands(image_shape: list[int]) -> list[dict[str, str]]:
    """The GPU rows: commands for a machine with an NVIDIA GPU, run in a work directory
    ``$WORK`` that holds a trained model (`python -m benchmarks.inference --workdir $WORK`
    trains into an empty one and keeps it)."""
    from tasks.serving.formats import INPUT_NAME, SIGNATURE

    hwc = "x".join(map(str, image_shape))
    shapes = " ".join(
        f"--{kind}Shapes={INPUT_NAME}:{size}x{hwc}"
        for kind, size in (("min", 1), ("opt", "${b}"), ("max", max(BATCHES)))
    )
    tftrt_dir = "$WORK/exports/saved_model_tftrt"
    return [
        {
            "what": "TensorRT fp16 engine from exports/model.onnx (trtexec: latency "
            "percentiles and throughput on random inputs; no accuracy)",
            "command": f"for b in {' '.join(map(str, BATCHES))}; do trtexec "
            f'--onnx="$WORK/exports/model.onnx" --fp16 {shapes} '
            f"--shapes={INPUT_NAME}:${{b}}x{hwc} --iterations=200 --percentile=50,99; done",
        },
        {
            "what": "TF-TRT fp16 on exports/saved_model (needs TensorFlow <= 2.17 with "
            "TensorRT: TensorFlow 2.18+ wheels, including this project's 2.21, are built "
            "without it, tensorflow/tensorflow#87911)",
            "command": 'python -c "from tensorflow.python.compiler.tensorrt import '
            "trt_convert as trt; c = trt.TrtGraphConverterV2(input_saved_model_dir="
            f"'$WORK/exports/saved_model', precision_mode='FP16'); c.convert(); "
            f"c.save('{tftrt_dir}')\" && python -m timeit -s \"import numpy as np, "
            f"tensorflow as tf; f = tf.saved_model.load('{tftrt_dir}').signatures"
            f"['{SIGNATURE}']; x = tf.constant(np.zeros((32, {', '.join(map(str, image_shape))}"
            f"), 'float32'))\" \"f({INPUT_NAME}=x)['probabilities'].numpy()\"",
        },
        {
            "what": "DALI `mixed` decoding (nvJPEG) of the test images as JPEG, batch "
            f"{inference_decode.DECODE_BATCH}: the GPU twin of the dali_decode_cpu row; writes "
            "benchmarks/results/inference_gpu.json",
            "command": 'python -m benchmarks.inference --gpu --workdir "$WORK"',
        },
    ]


def library_versions() -> dict[str, str]:
    """Versions of the inference runtimes (common.machine() lists the training stack)."""
    from importlib import metadata

    versions = {}
    for name in RUNTIME_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def measure_all(
    workdir: Path, quick: bool, scratch: Path, mlserver_venv: Path | None = None
) -> dict[str, Any]:
    """Every row, one after another, for the model in ``workdir`` (trained there if need be)."""
    model = ensure_model(workdir, quick, scratch)
    model_file = scratch / "model.json"
    model_file.write_text(json.dumps(model))
    common_args = worker_args(workdir, model_file, quick)
    sizes = registered_sizes(model)
    load_start, started = load_average(), time.perf_counter()
    log(f"measuring {model['uri']}; load {load_start}")
    rows = [
        measure_format(variant, common_args, sizes, workdir, quick, scratch)
        for variant in variants(workdir)
    ]
    keras_top1 = np.load(scratch / "keras.npy")
    for row in rows:
        top1 = np.load(scratch / f"{row['key']}.npy")
        row["top1_agreement_with_keras"] = float((top1 == keras_top1).mean())
    rows.append(measure_decode("cpu", common_args, quick, scratch))
    servers = [*inference_http.SERVERS, *([inference_http.MLSERVER] if mlserver_venv else [])]
    for spec in servers:
        rows.append(measure_http(spec, model, keras_top1, workdir, quick, scratch, mlserver_venv))
    load_end = load_average()
    log(f"measured in {time.perf_counter() - started:.0f} s; load {load_start} -> {load_end}")
    return {
        "rows": rows,
        "model": model,
        "load_avg_1min": {"start": load_start, "end": load_end},
        "measurement_s": time.perf_counter() - started,
        "sizes": asdict(SIZES[quick]),
        "runtimes": library_versions(),
        "gpu_not_measured": gpu_commands(model["image_shape"]),
    }


def measure_gpu(workdir: Path, quick: bool, scratch: Path) -> int:
    from nvidia.dali.backend import GetCUDADeviceCount

    if GetCUDADeviceCount() == 0:
        print("error: --gpu needs a CUDA GPU, and DALI sees none here", file=sys.stderr)
        return 2
    model = ensure_model(workdir, quick, scratch)
    model_file = scratch / "model.json"
    model_file.write_text(json.dumps(model))
    row = measure_decode("mixed", worker_args(workdir, model_file, quick), quick, scratch)
    write_rows("inference_gpu", quick, [row], model=model, runtimes=library_versions())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", type=Path, help="reuse (or train into and keep) this dir")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic run, results/quick/")
    parser.add_argument("--gpu", action="store_true", help="the GPU rows only (DALI mixed)")
    parser.add_argument(
        "--mlserver-venv",
        type=Path,
        help="a virtualenv built from benchmarks/mlserver-requirements.txt: adds MLServer's row",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--decode-worker", choices=("cpu", "mixed"), help=argparse.SUPPRESS)
    parser.add_argument("--model-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    startup.prepare_process()  # the pipeline's defaults (oneDNN on), for children too
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sizes = SIZES[args.quick]
    if args.worker:
        model = json.loads(args.model_file.read_text())
        [variant] = [v for v in variants(args.workdir) if v.key == args.worker]
        format_worker(variant, args.workdir, model, sizes, args.out)
        return 0
    if args.decode_worker:
        from tasks import prepared

        images, _ = prepared.load_split(args.workdir / "data" / "prepared", "test")
        inference_decode.decode_worker(
            args.decode_worker, images, sizes.warmup_calls, sizes.repeats, args.out
        )
        return 0
    venv = args.mlserver_venv
    if venv and not (venv / "bin" / "mlserver").is_file():
        parser.error(
            f"--mlserver-venv {venv}: no bin/mlserver there; build it with "
            "benchmarks/mlserver-requirements.txt (its header says how)"
        )
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        scratch = Path(tmp)
        workdir = (args.workdir or scratch / "work").resolve()
        if args.gpu:
            return measure_gpu(workdir, args.quick, scratch)
        record = measure_all(workdir, args.quick, scratch, venv and venv.resolve())
    rows = record.pop("rows")
    given = sys.argv[1:] if argv is None else argv
    invoked = shlex.join(["python", "-m", "benchmarks.inference", *given])
    path = write_rows("inference", args.quick, rows, invoked_as=invoked, **record)
    log(f"wrote {path.relative_to(REPO)}")
    return 0


def format_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in result["rows"]:
        if "latency_ms_batch1" not in row:
            continue
        latency = row["latency_ms_batch1"]
        rates = row["images_per_s"]
        rows.append(
            [
                code(row["key"]) + (" (quantized)" if row["quantized"] else ""),
                f"{row['runtime']}: {row['threads']}",
                size(row["bytes"]),
                f"{100 * row['accuracy']:.2f}%",
                f"{100 * row['top1_agreement_with_keras']:.2f}%",
                f"{ms(latency['p50'])} / {ms(latency['p99'])}",
                *(spread(rates[str(b)]) for b in (1, 32, 256)),
                f"{row['load_s']:.2f}",
                f"{row['peak_rss_mib']:,.0f}",
                load(row),
            ]
        )
    return rows


def credential_note(row: dict[str, Any]) -> str:
    if row["credential"]:
        return "the stack credential checked on every request"
    if row["key"] == inference_http.MLSERVER.key:
        return "no credential (MLServer 1.7.1 has no authentication of its own)"
    return "no credential"


def http_text(result: dict[str, Any]) -> str:
    servers = [row for row in result["rows"] if row["key"].startswith("http_")]
    rows = []
    for row in servers:
        for name, batches in row["inputs"].items():
            for batch, b in batches.items():
                rows.append(
                    [
                        code(row["server_command"]),
                        "JSON pixels" if name == "json" else "PNG files",
                        batch,
                        f"{ms(b['latency_ms']['p50'])} / {ms(b['latency_ms']['p99'])}",
                        str(b["latency_ms"]["n"]),
                        f"{b['images_per_s_sequential']:,.0f}",
                        f"{b['request_bytes_mean'] / 1024:,.1f} KiB",
                        f"{100 * b['top1_agreement_with_keras']:.2f}%",
                    ]
                )
    headers = [
        "server",
        "input",
        "batch",
        "round trip ms p50 / p99",
        "n",
        "images/s",
        "request",
        "top-1 = Keras",
    ]
    goal = ""
    onnx = next((r for r in servers if r["key"] == "http_serve_model_onnx"), None)
    if onnx:
        json_rows = onnx["inputs"]["json"]
        p50 = json_rows["1"]["latency_ms"]["p50"]
        rate = json_rows["32"]["images_per_s_sequential"]
        met = p50 <= HTTP_GOAL["batch1_p50_ms"] and rate >= HTTP_GOAL["batch32_images_per_s"]
        goal = (
            f"Goal: over authenticated HTTP with the JSON format, <= "
            f"{HTTP_GOAL['batch1_p50_ms']:g} ms p50 at batch 1 and >= "
            f"{HTTP_GOAL['batch32_images_per_s']:,} images/s at batch 32: the ONNX runtime "
            f"answers in {ms(p50)} ms and at {rate:,.0f} images/s: {verdict(met)}.\n\n"
        )
    if not any(row["key"] == inference_http.MLSERVER.key for row in servers):
        goal += (
            "Not measured in this run: MLServer; it needs its own virtualenv (MLServer 1.7.1 "
            "requires fastapi < 0.116, this project pins 0.150 for Prefect 3.8.8's server): "
            "build it from `benchmarks/mlserver-requirements.txt` and run "
            "`python -m benchmarks.inference --mlserver-venv DIR`.\n\n"
        )
    notes = "".join(
        f"- {code(row['key'])}: {row['threads']}; {credential_note(row)}; "
        f"first answer {row['first_answer_s']:.1f} s after the process started, "
        f"{row['server_rss_mib']:,.0f} MiB resident after the calls. Load {load(row)}.\n"
        for row in servers
    )
    return (
        "HTTP: each server as its own process on a loopback port, a client POSTing to "
        "/invocations over one kept-alive connection, bodies encoded before timing (JSON "
        "integer pixels; PNG files: the file as the body at batch 1, TF Serving's "
        '`{"instances": [{"b64": ...}]}` above), each answer read in full; images/s is the '
        "batch over the mean round trip. `make serve-model` runs `python -m flows.serve_model` "
        "(`--runtime auto` picks `onnx` for a version with an ONNX export).\n\n"
        + table(headers, rows)
        + "\n\n"
        + goal
        + notes
    )


def decode_text(row: dict[str, Any]) -> str:
    return (
        f'- {code(row["key"])}: DALI `fn.decoders.image(device="{row["device"]}")` on the '
        f"test images as JPEG (quality {row['jpeg_quality']}, {row['jpeg_bytes_mean']:.0f} bytes "
        f"each on average), batch {row['batch_size']}, {row['threads']}: "
        f"{spread(row['images_per_s'])} images/s; decoded pixels differ from Pillow's by at "
        f"most {row['max_abs_diff_vs_pillow']}. Load {load(row)}.\n"
    )


def gpu_text(result: dict[str, Any], gpu: dict[str, Any] | None) -> str:
    text = (
        "GPU rows, **not measured here** (this machine has no GPU). Run them in `$WORK`, a "
        "directory holding a trained model (`python -m benchmarks.inference --workdir "
        '"$WORK"` trains into an empty one and keeps it):\n'
    )
    for item in result["gpu_not_measured"]:
        text += f"\n- {item['what']}: not measured here.\n\n  ```\n  {item['command']}\n  ```\n"
    if gpu:
        text += "\nMeasured on a GPU machine (benchmarks/results/inference_gpu.json):\n\n"
        text += "".join(decode_text(row) for row in gpu["rows"])
    return text


def inference_section(
    result: dict[str, Any] | None, gpu: dict[str, Any] | None, quick: bool
) -> str:
    text = """## 6. Inference on this CPU: export formats and the model servers

One registered model, trained by the real pipeline (all six stages, so the export stage
wrote every format), run every way the project ships it, one after another. Each format
runs in its own process: `keras` is the registered raw-pixel model with a softmax
(`predict_on_batch`), `keras_predict` the same model through `model.predict`, which the
registered pyfunc (`tasks/serving/classifier_model.py`) now calls only for batches over 256
(one direct call below that: the HTTP batch-1 row); the other rows
are the export stage's files run by `tasks/serving/formats.py`'s runners. Latency: batch 1,
p50 / p99 over *n* timed calls after warm-up, each call on the next test image. Images/s:
back-to-back calls at that batch size, median (min-max) over *n* windows; at batch 1 it
follows the mean latency, so a heavy tail (contention for the two cores) pulls it below
1000 / p50. Accuracy and top-1 agreement with `keras`: the whole test split. Size: the
file or directory on disk (`keras`: the registered .keras file). Model load s: loading
plus the first answer. Peak RSS: the measuring process (runtime, model and the test set as float32).
"""
    if not result:
        return text + missing("inference", quick)
    model = result["model"]
    data = model["dataset"]
    counts = ", ".join(f"{n:,} {split}" for split, n in data["counts"].items())
    trained = model["trained_here"]
    how = (
        f"trained for this run by {code(model['pipeline_command'])} in {trained['wall_s']:.0f} s"
        if trained
        else "taken from an existing work directory (--workdir)"
    )
    rows = [r for r in result["rows"] if "latency_ms_batch1" in r]
    calls = rows[0]["latency_ms_batch1"]["n"] if rows else 0
    loads = result["load_avg_1min"]
    runtimes = ", ".join(f"{k} {v}" for k, v in result["runtimes"].items())
    text += (
        f"\nModel: {code(model['uri'])} on {data['name']} (data.source={data['source']}: "
        f"{counts}), {how}; test accuracy {100 * model['test_accuracy_evaluate_stage']:.2f}% "
        f"by the evaluate stage. Command: {code(result['invoked_as'])} "
        f"({result['measurement_s']:.0f} s of measurement, training excluded). 1-minute load "
        f"average: {loads['start']:.2f} at the start, {loads['end']:.2f} at the end. Threads: "
        "nothing in the project sets them, so LiteRT runs one (`formats.run_litert` passes no "
        "`num_threads`) and the others take their runtime's default. Runtimes: "
        f"{runtimes}.\n\n"
    )
    headers = [
        "format",
        "runtime: threads",
        "size",
        "test accuracy",
        "top-1 = Keras",
        f"batch-1 ms p50 / p99 (n={calls})",
        "images/s batch 1",
        "batch 32",
        "batch 256",
        "model load s",
        "peak RSS MiB",
        "load",
    ]
    text += table(headers, format_rows(result)) + "\n"
    if any(row["key"].startswith("http_") for row in result["rows"]):
        text += "\n" + http_text(result)
    decoders = [row for row in result["rows"] if row["key"].startswith("dali_decode")]
    if decoders:
        text += "\nDecoding uploads (not part of the model):\n\n"
        text += "".join(decode_text(row) for row in decoders)
    return text + "\n" + gpu_text(result, gpu)


if __name__ == "__main__":
    sys.exit(main())
