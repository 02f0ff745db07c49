"""Export stage: the version the register stage made, as SavedModel, LiteRT and ONNX,
each proven to answer like the Keras model (exports/parity.json).

Float formats must match the Keras model's probabilities within PARITY_BOUND and agree
on every top-1 label, or the stage fails naming the format and its numbers (and the
previous exports/ stays); quantized LiteRT variants are reported, not judged: their
accuracy next to the float model's is the number to decide on. The files are logged to
the pipeline's MLflow run under exports/ and listed in the model version's description.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import PipelineConfig, modality
from tasks.errors import ExportError
from tasks.serving import formats
from tasks.tracking import describe, registry, runs
from tasks.workspace import Workspace, atomic_dir, read_json

PARITY_BOUND = 1e-4  # max |probability difference| allowed for a float format


def parity_row(
    probabilities: np.ndarray, reference: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """How one format's answers compare with the Keras model's on the same images."""
    return {
        "max_abs_diff": float(np.abs(probabilities - reference).max()),
        "top1_agreement": float((probabilities.argmax(1) == reference.argmax(1)).mean()),
        "accuracy": float((probabilities.argmax(1) == labels).mean()),
    }


def measure_parity(
    model: Any, exports: Path, exported: list[formats.Exported], inputs: np.ndarray, labels: Any
) -> dict[str, Any]:
    """Run every exported file in its own runtime on ``inputs``; compare with Keras."""
    reference = np.asarray(model.predict(inputs, batch_size=256, verbose=0), dtype="float32")
    report: dict[str, Any] = {
        "samples": len(inputs),
        "bound": PARITY_BOUND,
        "keras": {"accuracy": float((reference.argmax(1) == labels).mean())},
        "formats": {},
    }
    for item in exported:
        predict = formats.RUNNERS[item.runner](exports / item.file)
        row = parity_row(predict(inputs), reference, labels)
        report["formats"][item.variant] = {
            "file": item.file,
            "bytes": disk_bytes(exports / item.file),
            "quantized": item.quantized,
            **row,
            "accuracy_delta": row["accuracy"] - report["keras"]["accuracy"],
        }
    return report


def disk_bytes(path: Path) -> int:
    """Size on disk of a file, or of every file in a directory (a SavedModel)."""
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def parity_failures(report: dict[str, Any]) -> list[str]:
    """Float formats outside the bound, each with its numbers."""
    return [
        f"{variant}: max |p - p_keras| = {row['max_abs_diff']:.3g} (bound {PARITY_BOUND:g}), "
        f"top-1 agreement {row['top1_agreement']:.4f} on {report['samples']} test images"
        for variant, row in report["formats"].items()
        if not row["quantized"]
        # `not <=`: a NaN difference is a failure, never "within the bound"
        and not (row["max_abs_diff"] <= PARITY_BOUND and row["top1_agreement"] >= 1.0)
    ]


def registered_version(ws: Workspace) -> tuple[str, str, str]:
    """(name, version, run id) of the version the register stage made."""
    if not ws.registration.is_file():
        raise ExportError(
            f"{ws.registration} not found: the export stage exports the version the register "
            "stage made; run it first (`dvc repro register`)"
        )
    record = read_json(ws.registration)
    return record["model_name"], str(record["version"]), record["run_id"]


def export(cfg: PipelineConfig, ws: Workspace, name: str, version: str) -> dict[str, Any]:
    """Write exports/ for ``name`` version ``version``, parity-checked; return parity.json."""
    settings = cfg.export
    model = formats.probabilities_model(registry.load_version(name, version))
    # Raw pixels (images) or token-id contexts (text), as the registered Keras model takes.
    if modality(cfg.data.source) == "text":
        from tasks.text.export import export_samples
    else:
        from tasks.images.export import export_samples
    inputs, labels, representative = export_samples(cfg, ws)
    with atomic_dir(ws.exports) as staging, tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        exported, unsupported = formats.write_formats(
            model, staging, Path(scratch), settings.formats, settings.quantize, representative
        )
        report = measure_parity(model, staging, exported, inputs, labels)
        report |= {"model": f"models:/{name}/{version}", "unsupported": unsupported}
        report["seconds"] = round(time.perf_counter() - started, 2)
        if failures := parity_failures(report):
            raise ExportError("export parity failed: " + "; ".join(failures))
        (staging / "parity.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def publish(name: str, version: str, run_id: str, report: dict[str, Any], ws: Workspace) -> None:
    """Log exports/ to the run (parity.json among them) and list each file with its parity
    in the version's description, where a person browsing the registry looks (as run
    metrics they would be single-value charts, two per format)."""
    import mlflow

    mlflow.log_artifacts(str(ws.exports), artifact_path="exports")
    client = mlflow.MlflowClient()
    rows = []
    for variant, row in report["formats"].items():
        rows.append(
            f"{variant}: `runs:/{run_id}/exports/{row['file']}` ({row['bytes']} bytes), "
            f"test accuracy {row['accuracy']:.4f}, top-1 agreement "
            f"{row['top1_agreement']:.4f}, max |probability difference| "
            f"{row['max_abs_diff']:.2g}"
        )
    rows += [
        f"{variant}: unsupported: {reason}" for variant, reason in report["unsupported"].items()
    ]
    described = client.get_model_version(name, version).description
    client.update_model_version(name, version, describe.with_exports(described, rows))


def run(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The stage as `dvc repro` and the Prefect flow call it; closes the pipeline run."""
    formats.check_converters(cfg.export.formats)  # before any work
    name, version, registered_by = registered_version(ws)
    # The run that registered the version: its page lists the version's exports.
    with runs.stage_run(cfg, ws, "export", last=True, run_id=registered_by) as run_id:
        report = export(cfg, ws, name, version)
        publish(name, version, run_id, report, ws)
    return report
