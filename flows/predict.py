"""Batch prediction: image files through a registered model version, bad files set aside.

    python -m flows.predict data/incoming          # make predict IMAGES=data/incoming
    python -m flows.predict photo.png --model models:/cifar10-seed_cnn/3 --top-k 5
    prefect deployment run 'batch-predict/predict' -p images=data/incoming --watch

IMAGES is a PNG or JPEG file or a directory (every file under it, sorted). Each file is
decoded and resized to the model's input with DALI (tasks/images/decode.py, which says
how gray, color, alpha and 16-bit files are converted) and predicted by the version's
MLflow pyfunc. Predictions go to one CSV (path, label, score, top_k, converted), files
that could not be used to another (path, reason); each file appears only when complete.
A bad file never stops the batch.

The model is models:/<name>/<version> or models:/<name>@<alias>, by default
models:/<register.model_name>@champion from params.yaml, in the store MLFLOW_TRACKING_URI
or params.yaml names. Loading a pyfunc runs the model code stored with it, so only
versions whose code is this repository's tasks/serving/classifier_model.py (as it is now
or in any commit) are loaded.

Refused before any work with one line and exit 2 (a flow run: Failed with the message):
a missing path, no PNG or JPEG file, a malformed model URI, a model, version or alias the
registry does not have, a top-k below 1. Exit 1 when files were found but none could be
predicted. The `batch-predict/predict` deployment reads images only inside the project,
writes predictions.csv and errors.csv to runs/<flow-run-id>/ and logs them to the MLflow
experiment `batch-predict`, tagged with the model name and version.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow
from prefect.runtime import flow_run

from flows import reporting
from flows.common import failed_without_traceback, mlflow_client
from flows.rundir import RUN_ID_FIELD, run_root
from tasks import startup
from tasks.config import load_config
from tasks.errors import ModelRequestError
from tasks.images import decode
from tasks.serving.registered import (
    MAX_QUOTED_CHARS,
    ModelRef,
    check_model_code,
    download_version,
    input_shape,
    parse_model_uri,
    resolve_version,
)
from tasks.tracking import runs, store
from tasks.tracking.registry import CHAMPION
from tasks.workspace import Workspace, atomic_path

DEFAULT_TOP_K = 3
DEFAULT_OUT = "runs/predict/predictions.csv"  # runs/ is git- and DVC-ignored
DEFAULT_ERRORS = "runs/predict/errors.csv"
PREDICTION_COLUMNS = ("path", "label", "score", "top_k", "converted")
ERROR_COLUMNS = ("path", "reason")
CHUNK_FILES = 256  # files read, decoded and predicted at a time: memory stays bounded
EXPERIMENT = "batch-predict"  # the MLflow experiment of deployment runs
SUMMARY_KEY = "batch-predict-summary"  # the Prefect artifact's key
SUMMARY_ERRORS = 10  # bad files listed in the summary artifact


@dataclass(frozen=True)
class Request:
    """A checked request: what to read, which version, where the registry is."""

    files: list[Path]
    ref: ModelRef
    version: str
    top_k: int
    tracking_uri: str
    device: str  # where DALI decodes: "gpu" or "cpu"

    @property
    def model_uri(self) -> str:
        return f"models:/{self.ref.name}/{self.version}"


@dataclass(frozen=True)
class LoadedModel:
    uri: str
    pyfunc: Any
    shape: tuple[int, int, int]  # H, W, C of one input image


@dataclass
class Outcome:
    files: int
    predicted: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    labels: Counter = field(default_factory=Counter)


def prepare_process() -> str | None:
    """startup.prepare_process (calm logs, no telemetry, no progress bars), and TensorFlow
    growing its GPU memory: it takes nearly all of it when it starts on a GPU, and DALI's
    decoder needs some in the same process. Returns the CPU-only note to print."""
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    return startup.prepare_process()


def check_top_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ModelRequestError(f"top-k {top_k!r} must be a whole number >= 1")
    return top_k


def find_images(images: str, within: Path | None) -> list[Path]:
    """The files to predict, or ModelRequestError when there is nothing to predict.

    ``within``: a deployment run reads only inside this directory (the project).
    """
    if not images:
        raise ModelRequestError(
            "no images given: name a PNG or JPEG file or a directory of them "
            "(make predict IMAGES=...)"
        )
    path = Path(images)
    quoted = repr(images)[:MAX_QUOTED_CHARS]
    if within is not None and not (within / path).resolve().is_relative_to(within.resolve()):
        raise ModelRequestError(
            f"images {quoted}: a deployment run reads images only inside the project "
            f"({within}); put them there (e.g. a DVC-tracked folder) and pass that path"
        )
    if not path.exists():
        raise ModelRequestError(f"images {quoted}: no such file or directory")
    files = decode.list_files(path)
    readable = [f for f in files if within is None or f.resolve().is_relative_to(within.resolve())]
    if not any(decode.has_image_signature(f) for f in readable):
        what = f"{len(files)} files, none of them" if path.is_dir() else "it is not"
        raise ModelRequestError(
            f"images {quoted}: no PNG or JPEG file ({what} a PNG or JPEG image)"
        )
    return files


def prepare(
    images: str, model_uri: str | None, top_k: Any, project: Path, within: Path | None = None
) -> Request:
    """Every check, before any work: the arguments first, then the registry."""
    from tasks.images.augment import resolve_device

    ref = parse_model_uri(model_uri) if model_uri is not None else None
    top_k = check_top_k(top_k)
    files = find_images(images, within)
    cfg = load_config(project / "params.yaml")
    ref = ref or ModelRef(cfg.register.model_name, None, CHAMPION)
    uri = store.tracking_uri(cfg.mlflow, project)
    version = resolve_version(mlflow_client(uri), ref, uri)
    return Request(files, ref, version, top_k, uri, resolve_device(cfg.preprocess.device))


@contextmanager
def open_model(request: Request) -> Iterator[LoadedModel]:
    """The version, downloaded to a temporary directory, checked, then loaded from there."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="batch-predict-") as scratch:
        local = download_version(request.model_uri, request.tracking_uri, Path(scratch))
        check_model_code(local, request.model_uri)
        pyfunc = mlflow.pyfunc.load_model(local)
        yield LoadedModel(request.model_uri, pyfunc, input_shape(pyfunc, request.model_uri))


def top_classes(probabilities: dict[str, float], k: int) -> list[tuple[str, float]]:
    """The k most probable classes, best first (ties in class order, like the label)."""
    return sorted(probabilities.items(), key=lambda item: -item[1])[:k]


def prediction_row(path: Path, answer: Any, note: str, k: int) -> tuple[list[str], str]:
    """The CSV row and the printed line for one predicted file."""
    top = top_classes(answer.probabilities, k)
    top_k = json.dumps([[label, round(p, 6)] for label, p in top])
    line = f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in top)
    return [str(path), answer.label, f"{answer.score:.6f}", top_k, note], line


def predict_chunk(
    model: LoadedModel,
    decoder: decode.Decoder,
    paths: list[Path],
    within: Path | None,
) -> dict[Path, tuple[Any, str] | str]:
    """Per file: (its prediction row from the pyfunc, conversion note), or why not."""
    results: dict[Path, tuple[Any, str] | str] = {}
    readable = []
    for path in paths:
        loaded = decode.read_image(path, within)
        if isinstance(loaded, str):
            results[path] = loaded
        else:
            readable.append((path, loaded))
    decoded = []
    for (path, encoded), pixels in zip(
        readable, decoder.decode([e for _, e in readable]), strict=True
    ):
        if isinstance(pixels, str):
            results[path] = pixels
        else:
            decoded.append((path, decode.conversions(encoded.info, model.shape), pixels))
    if decoded:
        batch = np.stack([pixels for _, _, pixels in decoded]).astype(np.float32)
        answers = model.pyfunc.predict(batch)
        for (path, note, _), answer in zip(decoded, answers.itertuples(), strict=True):
            results[path] = (answer, note)
    return results


def predict_files(
    model: LoadedModel,
    request: Request,
    out: Path,
    errors: Path,
    within: Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> Outcome:
    """Predict ``request.files`` in chunks; write both CSVs (each replaced only when done)."""
    decoder = decode.Decoder(model.shape, request.device)
    outcome = Outcome(files=len(request.files))
    with (
        atomic_path(out) as out_tmp,
        atomic_path(errors) as errors_tmp,
        out_tmp.open("w", newline="") as out_file,
        errors_tmp.open("w", newline="") as errors_file,
    ):
        rows, bad = csv.writer(out_file), csv.writer(errors_file)
        rows.writerow(PREDICTION_COLUMNS)
        bad.writerow(ERROR_COLUMNS)
        for start in range(0, len(request.files), CHUNK_FILES):
            paths = request.files[start : start + CHUNK_FILES]
            results = predict_chunk(model, decoder, paths, within)
            for path in paths:
                if isinstance(results[path], str):
                    outcome.failures.append((str(path), results[path]))
                    bad.writerow([str(path), results[path]])
                    line = f"{path}: skipped: {results[path]}"
                else:
                    answer, note = results[path]
                    row, line = prediction_row(path, answer, note, request.top_k)
                    rows.writerow(row)
                    outcome.predicted += 1
                    outcome.labels[answer.label] += 1
                if echo:
                    echo(line)
    return outcome


def summary_line(request: Request, outcome: Outcome, out: Path, errors: Path) -> str:
    line = f"{outcome.predicted} of {outcome.files} files predicted by {request.model_uri}"
    if request.ref.alias:
        line += f" ({request.ref})"
    line += f": {out}"
    if outcome.failures:
        line += f"; {len(outcome.failures)} could not be used, reasons in {errors}"
    return line


# --- the deployment -------------------------------------------------------------------


def publish_summary(request: Request, outcome: Outcome, outdir: Path, run: Any) -> str:
    """The flow run's markdown artifact: the model, the counts, the files, the first errors."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    links = reporting.ui_links(mlflow.get_tracking_uri(), run, None)
    run_cell = f"[{run.info.run_id}]({links['run']})" if links["run"] else f"`{run.info.run_id}`"
    common = ", ".join(f"{cell(label)} ({n})" for label, n in outcome.labels.most_common(5))
    rows = [
        ("Model", f"`{request.model_uri}`" + (f" (`{request.ref}`)" if request.ref.alias else "")),
        ("Files", str(outcome.files)),
        ("Predicted", str(outcome.predicted)),
        ("Could not be used", str(len(outcome.failures))),
        ("Most frequent labels", common or "-"),
        ("Outputs", f"`{outdir}` (predictions.csv, errors.csv)"),
        ("MLflow run", run_cell),
    ]
    markdown = "## Batch prediction\n\n" + reporting.markdown_table(rows, ("Batch", "Value"))
    if outcome.failures:
        shown = outcome.failures[:SUMMARY_ERRORS]
        table = reporting.markdown_table(
            [(f"`{cell(p)}`", cell(r)) for p, r in shown], ("File", "Why it was not predicted")
        )
        markdown += f"\n### Files not predicted (first {len(shown)})\n\n{table}"
    create_markdown_artifact(key=SUMMARY_KEY, markdown=markdown, description="Batch prediction")
    return markdown


def predict_and_log(
    request: Request, images: str, project: Path, outdir: Path
) -> tuple[Outcome, Any]:
    """Predict into ``outdir`` inside an MLflow run of experiment batch-predict."""
    import mlflow

    cfg = load_config(project / "params.yaml", {"mlflow.experiment": EXPERIMENT})
    runs.configure(cfg, Workspace(project))
    experiment = mlflow.MlflowClient().get_experiment_by_name(EXPERIMENT)
    tags = {
        "model_name": request.ref.name,
        "model_version": request.version,
        "model_uri": request.model_uri,
        "prefect.flow_run_id": str(flow_run.get_id()),
    }
    out, errors = outdir / "predictions.csv", outdir / "errors.csv"
    run_name = f"predict-{flow_run.get_name() or 'local'}"
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=run_name, tags=tags):
        mlflow.log_params(
            {
                "images": images[:MAX_QUOTED_CHARS],
                "model_uri": str(request.ref),
                "top_k": request.top_k,
            }
        )
        with open_model(request) as model:
            outcome = predict_files(model, request, out, errors, within=project, echo=None)
        mlflow.log_metrics(
            {
                "files": outcome.files,
                "predicted": outcome.predicted,
                "failed": len(outcome.failures),
            }
        )
        mlflow.log_artifact(str(out), artifact_path="predict")
        mlflow.log_artifact(str(errors), artifact_path="predict")
        run = mlflow.active_run()
    return outcome, mlflow.MlflowClient().get_run(run.info.run_id)


@flow(name="batch-predict", log_prints=True)
def batch_predict(
    images: str, model_uri: str | None = None, top_k: int = DEFAULT_TOP_K
) -> dict[str, Any]:
    """Predict every PNG/JPEG file of ``images`` with a registered version; write
    predictions.csv and errors.csv to runs/<flow-run-id>/ and log them to MLflow.

    images: a file or directory inside the project (e.g. a DVC-tracked folder).
    model_uri: models:/<name>/<version> or models:/<name>@<alias>; default the champion
        of params.yaml's register.model_name.
    top_k: classes listed per image, best first.
    """
    from prefect.states import Failed

    project = Path.cwd()
    if note := prepare_process():
        print(note)
    try:
        request = prepare(images, model_uri, top_k, project, within=project)
        outdir = run_root(f"runs/{RUN_ID_FIELD}", flow_run.get_id())
        outcome, run = predict_and_log(request, images, project, outdir)
    except ModelRequestError as error:
        return Failed(message=str(error))
    except Exception as error:
        return failed_without_traceback(error)
    out, errors = outdir / "predictions.csv", outdir / "errors.csv"
    print(summary_line(request, outcome, out, errors))
    publish_summary(request, outcome, outdir, run)
    if not outcome.predicted:
        return Failed(message=f"none of the {outcome.files} files could be used: see {errors}")
    return {
        "predictions": str(out),
        "errors": str(errors),
        "model_name": request.ref.name,
        "model_version": request.version,
        "model_uri": request.model_uri,
        "requested_model_uri": str(request.ref),
        "files": outcome.files,
        "predicted": outcome.predicted,
        "failed": len(outcome.failures),
        "mlflow_run_id": run.info.run_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", help="a PNG or JPEG file, or a directory of them")
    parser.add_argument(
        "--model",
        help="models:/<name>/<version> or models:/<name>@<alias> "
        "(default: models:/<register.model_name>@champion)",
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="default %(default)s")
    parser.add_argument("--out", default=DEFAULT_OUT, help="predictions CSV (%(default)s)")
    parser.add_argument("--errors", default=DEFAULT_ERRORS, help="errors CSV (%(default)s)")
    args = parser.parse_args(argv)
    out, errors = Path(args.out), Path(args.errors)
    note = prepare_process()  # printed once the request is accepted: a refusal is one line
    signal.signal(signal.SIGTERM, startup.raise_interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from flows.stage import expected_errors

    try:
        if out.resolve() == errors.resolve() or out.is_dir() or errors.is_dir():
            raise ModelRequestError(f"--out {out} and --errors {errors} must be two file paths")
        request = prepare(args.images, args.model, args.top_k, Path.cwd())
        if note:
            print(note, file=sys.stderr)
        startup.import_tensorflow()  # without its loading banners on a CPU-only machine
        with open_model(request) as model:
            outcome = predict_files(model, request, out, errors)
    except (ModelRequestError, *expected_errors()) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"batch prediction stopped by {str(error) or 'SIGINT'}", file=sys.stderr)
        return 130
    print(summary_line(request, outcome, out, errors))
    return 0 if outcome.predicted else 1


if __name__ == "__main__":
    sys.exit(main())
