"""Rebuild a registered model version from what it records, and compare it with the original.

    python -m flows.reproduce models:/cifar10-seed_cnn/3
    prefect deployment run 'reproduce-version/reproduce' \
        -p model_uri=models:/cifar10-seed_cnn/3 --watch

The version's tags name its commit, data version (DVC hash) and resolved params. That
commit is checked out in a temporary git worktree, the data version is restored there
with DVC (the project's cache, else its remote), and the commit's own pipeline reruns the
stages after data, without register, with the version's params as overrides, logging to
the same tracking store in a run of its own tagged ``reproduces=<name>/<version>``. Then
the original run's test metrics and the reproduction's are printed side by side and
judged by the rule in flows/reproduce/rules.py: exit 0 on a match, 1 on a difference, 2 when
the version cannot be rebuilt (refused before any work, nothing left RUNNING).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import mlflow_client
from flows.reproduce.checkout import (
    check_commit_known,
    check_data_available,
    restore_data,
    temporary_checkout,
)
from flows.reproduce.rules import (
    CROSS_DEVICE_TOLERANCE,
    DEFAULT_TOLERANCE,
    REPRODUCES_TAG,
    Outcome,
    Rebuilt,
    VersionRecord,
    check_tolerance,
    choose_rule,
    class_f1_metrics,
    compare,
    parse_model_uri,
    verdict,
)
from tasks import startup
from tasks.config import load_config
from tasks.errors import ReproduceError
from tasks.tracking import lineage, store
from tasks.workspace import read_json, write_json

SUMMARY_KEY = "reproduction-summary"  # the Prefect artifact's key
CHANGES_ARTIFACT = lineage.CHANGES_ARTIFACT  # what a -dirty version's run recorded
PER_CLASS_ARTIFACT = "evaluate/per_class.json"  # logged by the evaluate stage
STOP_WAIT_S = 10  # for the pipeline process to end its MLflow run after each SIGTERM
STOP_ATTEMPTS = 3

# Runs inside the temporary checkout, so it imports that commit's flows and tasks: the
# stages after data, without register, with the version's params as overrides. A fixed
# program; its only inputs are two file paths (overrides in, result out).
RUNNER = """
import json, signal, sys
from importlib.metadata import version
from pathlib import Path


def stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


signal.signal(signal.SIGTERM, stop)
import flows.pipeline
import tensorflow as tf
from flows.stage import STAGE_NAMES
from tensorflow.python.framework import config
from tensorflow.python.util import _pywrap_util_port

overrides = json.loads(Path(sys.argv[1]).read_text())
stages = [name for name in STAGE_NAMES if name not in ("data", "register", "export")]
try:
    flows.pipeline.training_pipeline(overrides=overrides, workdir=".", stages=stages)
except Exception as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
result = {
    "op_determinism": config.is_op_determinism_enabled(),
    "onednn": bool(_pywrap_util_port.IsMklEnabled()),
    "libraries": {name: version(name) for name in ("tensorflow", "keras")},
    "code": flows.pipeline.__file__,
    "gpus": [
        tf.config.experimental.get_device_details(gpu).get("device_name", "GPU")
        for gpu in tf.config.list_physical_devices("GPU")
    ],
}
Path(sys.argv[2]).write_text(json.dumps(result))
"""


def project_tracking_uri(project: Path) -> str:
    """The store the pipeline logs to: MLFLOW_TRACKING_URI, else params.yaml's, from ``project``."""
    return store.tracking_uri(load_config(project / "params.yaml").mlflow, project)


def read_version(client: Any, name: str, version: str, uri: str) -> VersionRecord:
    """The version's tags, validated; a version that does not exist is refused by name."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ReproduceError(not_found(client, name, version, uri)) from None
    return VersionRecord.from_tags(name, version, found.tags)


def not_found(client: Any, name: str, version: str, uri: str) -> str:
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if not versions:
        return f"models:/{name}/{version} does not exist: no registered model {name!r} in {uri}"
    return (
        f"models:/{name}/{version} does not exist: {name!r} has versions "
        f"{versions[0]} to {versions[-1]} in {uri}"
    )


def original_metrics(client: Any, record: VersionRecord) -> dict[str, float]:
    """The test metrics the version's own run logged, and its per-class F1 from the run's
    evaluate/per_class.json (older runs logged them as metrics too: compare reads both)."""
    from mlflow.exceptions import MlflowException

    try:
        metrics = dict(client.get_run(record.run_id).data.metrics)
    except MlflowException:
        raise ReproduceError(
            f"{record.uri}: its run {record.run_id} is not in the tracking store any more, "
            "so there are no original metrics to compare with"
        ) from None
    with tempfile.TemporaryDirectory() as scratch, without_progress_bars():
        try:
            path = client.download_artifacts(record.run_id, PER_CLASS_ARTIFACT, scratch)
        except (MlflowException, OSError):
            return metrics  # a language model, or a run from before that artifact
        return metrics | class_f1_metrics(read_json(Path(path)))


@contextmanager
def without_progress_bars() -> Iterator[None]:
    """MLflow draws a download progress bar on stderr; this command's stderr is its one
    error line (a refusal) or nothing."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    kept = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if kept is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = kept


def check_rebuildable(project: Path, record: VersionRecord, uri: str) -> str | None:
    """Refuse, before any work, a version git cannot give back the code of. For a version
    trained from a dirty tree, return the diff its run recorded (applied to the checkout)."""
    check_commit_known(project, record.commit, record.uri)
    check_data_available(project, record)
    if not record.dirty:
        return None
    diff = recorded_changes(record, uri)
    if diff is None:
        raise ReproduceError(
            f"{record.uri} was trained from {record.commit}-dirty: tracked files differed "
            "from that commit and the difference was never recorded, so git cannot rebuild "
            "it; commit changes before training (`git commit`, then `dvc repro`) so that the "
            "versions it registers can be reproduced"
        )
    return diff


def recorded_changes(record: VersionRecord, uri: str) -> str | None:
    """The tracked-file diff the version's run logged (lineage/tracked_changes.diff)."""
    import tempfile

    import mlflow

    folder, _, _ = CHANGES_ARTIFACT.rpartition("/")
    listed = mlflow.MlflowClient(tracking_uri=uri).list_artifacts(record.run_id, folder)
    if CHANGES_ARTIFACT not in {item.path for item in listed}:
        return None  # registered before diffs were recorded
    with tempfile.TemporaryDirectory() as scratch, without_progress_bars():
        local = mlflow.artifacts.download_artifacts(
            run_id=record.run_id, artifact_path=CHANGES_ARTIFACT, dst_path=scratch, tracking_uri=uri
        )
        return Path(local).read_text()


def apply_changes(checkout: Path, diff: str, record: VersionRecord) -> None:
    """Put the version's uncommitted changes on top of its commit, as it was trained."""
    patch = checkout / ".pipeline" / "tracked_changes.diff"  # git-ignored
    patch.parent.mkdir(parents=True, exist_ok=True)
    patch.write_text(diff)
    applied = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", str(patch)],
        cwd=checkout,
        capture_output=True,
        text=True,
    )
    if applied.returncode != 0:
        raise ReproduceError(
            f"{record.uri}: its recorded changes do not apply to {record.commit[:12]}: "
            f"{applied.stderr.strip()}"
        )


def child_env(tracking_uri: str, record: VersionRecord) -> dict[str, str]:
    """The pipeline process's environment: the same tracking store, none of a Prefect
    worker's per-flow-run variables (PREFECT__FLOW_RUN_ID...): its flow run is its own, and
    oneDNN's CPU kernels as the version trained with them. A version that does not record
    them trained with its commit's own default, so that commit's code (and TensorFlow)
    decide again, unless the user set TF_ENABLE_ONEDNN_OPTS."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT__")}
    env[store.TRACKING_ENV] = tracking_uri
    defaults = startup.process_defaults()
    del defaults[startup.ONEDNN_ENV]  # the version's recorded setting, or its commit's default
    recorded = {}
    if record.onednn is not None:
        recorded = {startup.ONEDNN_ENV: "1" if record.onednn else "0"}
    return defaults | env | recorded  # what the user set wins, but for what the version recorded


def run_to_end(command: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Run ``command``; if we are stopped meanwhile, stop it too (SIGTERM lets its pipeline
    end its MLflow run KILLED) before the checkout is removed under it."""
    child = subprocess.Popen(command, cwd=cwd, env=env)
    try:
        return child.wait()
    except BaseException:
        stop(child)
        raise


def stop(child: subprocess.Popen) -> None:
    """SIGTERM, repeated: Python raises a signal's exception in whatever code runs when it
    arrives, and one that lands in a finalizer is printed and dropped ("Exception
    ignored"), so a single SIGTERM can go unnoticed. SIGKILL as the last resort."""
    for _ in range(STOP_ATTEMPTS):
        child.terminate()
        try:
            child.wait(timeout=STOP_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue
    child.kill()
    child.wait()


def rerun_pipeline(checkout: Path, record: VersionRecord, tracking_uri: str) -> Rebuilt:
    """The commit's own pipeline, after data and without register, on the version's params."""
    overrides = checkout / ".pipeline" / "reproduce-overrides.json"  # git-ignored
    result = checkout / ".pipeline" / "reproduce-result.json"
    write_json(overrides, record.params)
    command = [sys.executable, "-c", RUNNER, str(overrides), str(result)]
    returncode = run_to_end(command, checkout, child_env(tracking_uri, record))
    if returncode != 0 or not result.is_file():
        raise ReproduceError(
            f"rebuilding {record.uri}: the pipeline of commit {record.commit[:12]} failed "
            f"(exit {returncode}); its own error is in the output above"
        )
    info = read_json(result)
    if not Path(info["code"]).resolve().is_relative_to(checkout):
        raise ReproduceError(
            f"rebuilding {record.uri}: the pipeline ran code from {info['code']}, not from the "
            f"checkout of {record.commit[:12]} (PYTHONPATH or an install shadows it)"
        )
    preprocessed = checkout / "data" / "preprocess"
    return Rebuilt(
        op_determinism=bool(info["op_determinism"]),
        onednn=info.get("onednn"),
        libraries=info["libraries"],
        device=", ".join(info["gpus"]) or lineage.device_description("cpu"),
        preprocess_version=lineage.dvc_hash(preprocessed) if preprocessed.is_dir() else None,
    )


def reproduction_run(client: Any, checkout: Path, record: VersionRecord) -> str | None:
    """The MLflow run the pipeline opened in ``checkout`` (its pipeline.workdir tag), tagged
    as reproducing ``record``; None if it never got that far."""
    experiment = client.get_experiment_by_name(record.params.get("mlflow.experiment", ""))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`pipeline.workdir` = '{checkout}'"
    )
    if not runs:
        return None
    run_id = runs[0].info.run_id
    client.set_tag(run_id, REPRODUCES_TAG, f"{record.name}/{record.version}")
    return run_id


def rebuild_metrics(checkout: Path) -> dict[str, float]:
    """The reproduction's test metrics, named as original_metrics names them. Older commits
    kept the per-class numbers inside reports/metrics.json, then in reports/per_class.json;
    a language model has none."""
    from tasks.tracking.runs import test_metrics
    from tasks.workspace import Workspace

    ws = Workspace(checkout)
    metrics = read_json(ws.metrics)
    if "per_class" not in metrics:
        places = (ws.per_class, ws.reports / "per_class.json")
        found = next((path for path in places if path.is_file()), None)
        metrics["per_class"] = read_json(found) if found else {}
    return test_metrics(metrics["test"]) | class_f1_metrics(metrics["per_class"])


def reproduce_version(
    model_uri: str,
    project: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    cross_device_tolerance: float = CROSS_DEVICE_TOLERANCE,
) -> Outcome:
    """Rebuild ``model_uri`` in a temporary checkout and compare; the one implementation
    behind the command line and the Prefect flow. Every refusal (ReproduceError) happens
    before the checkout; the checkout is gone when this returns or raises."""
    name, version = parse_model_uri(model_uri)
    tolerance = check_tolerance(tolerance)
    cross_device_tolerance = check_tolerance(cross_device_tolerance)
    uri = project_tracking_uri(project)
    client = mlflow_client(uri)
    record = read_version(client, name, version, uri)
    changes = check_rebuildable(project, record, uri)
    original = original_metrics(client, record)
    print(f"reproducing {record.uri}: commit {record.commit}, run {record.run_id}", flush=True)
    with temporary_checkout(project, record.commit) as checkout:
        if changes is not None:
            apply_changes(checkout, changes, record)
            print(f"applied the tracked-file changes its run recorded ({CHANGES_ARTIFACT})")
        restored = restore_data(project, checkout, record)
        print(f"data: {restored}", flush=True)
        print(f"rerunning the stages after data, without register, in {checkout}", flush=True)
        try:
            rebuilt = rerun_pipeline(checkout, record, uri)
        except BaseException:
            with suppress(Exception):  # tag a failed rebuild's run too; its error comes first
                reproduction_run(client, checkout, record)
            raise
        run_id = reproduction_run(client, checkout, record)
        reproduced = rebuild_metrics(checkout)
    rule = choose_rule(record, rebuilt, tolerance, cross_device_tolerance)
    outcome = Outcome(record, rebuilt, run_id, rule, compare(original, reproduced))
    if run_id is not None:
        client.set_tag(run_id, f"{REPRODUCES_TAG}.match", str(outcome.matched).lower())
    print(outcome.report(), flush=True)
    return outcome


@flow(name="reproduce-version", log_prints=True)
def reproduce(
    model_uri: str,
    tolerance: float = DEFAULT_TOLERANCE,
    cross_device_tolerance: float = CROSS_DEVICE_TOLERANCE,
) -> dict[str, Any]:
    """Rebuild a registered version and compare it with the original; Failed when it cannot
    be rebuilt or does not match. Runs in the directory the deployment was registered from.

    model_uri: models:/<name>/<version> (checked against a strict pattern before use).
    tolerance: absolute, per metric, when the exact rule does not apply.
    cross_device_tolerance: absolute, per metric, when one side trained on a GPU and the
        other on a CPU.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Failed

    from flows.common import failed_without_traceback

    try:
        outcome = reproduce_version(model_uri, Path.cwd(), tolerance, cross_device_tolerance)
    except ReproduceError as error:
        return Failed(message=str(error))
    except Exception as error:
        return failed_without_traceback(error)
    create_markdown_artifact(
        key=SUMMARY_KEY,
        markdown=f"```\n{outcome.report()}\n```",
        description="Reproduction: rebuilt metrics against the original's",
    )
    if not outcome.matched:
        return Failed(message=f"{outcome.record.uri}: {verdict(outcome.rows, outcome.rule)}")
    return outcome.as_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_uri", help="models:/<name>/<version>")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="absolute, per metric, when the exact rule does not apply (default %(default)g)",
    )
    parser.add_argument(
        "--cross-device-tolerance",
        type=float,
        default=CROSS_DEVICE_TOLERANCE,
        help="absolute, per metric, when the version trained on a GPU and this machine "
        "rebuilds it on a CPU, or the other way round (default %(default)g)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the pipeline process is stopped, the checkout removed.
    signal.signal(signal.SIGTERM, startup.raise_interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from flows.stage import expected_errors

    try:
        outcome = reproduce_version(
            args.model_uri, Path.cwd(), args.tolerance, args.cross_device_tolerance
        )
    except (ReproduceError, *expected_errors()) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"reproduction stopped by {str(error) or 'SIGINT'}", file=sys.stderr)
        return 130
    return 0 if outcome.matched else 1
