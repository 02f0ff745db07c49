"""One MLflow run per pipeline execution, shared by stages in separate processes.

`dvc repro` runs each stage as its own process, so the run id travels in a small
handle file (``.pipeline/mlflow_run.json``). A stage joins the run named there when
that run is still open and was opened for the same resolved config; otherwise it opens
a new one. The register stage closes the run, so the next `dvc repro` (which may rerun
only train, evaluate and register) gets a fresh run. The Prefect flow always opens a
new run first, and its stages join it the same way.

A stage that fails on a transient cause (the tracking server or the network is briefly
unreachable) leaves the run open, so a retry of that stage continues the same run.

The store this stands on (URI, client defaults, transient errors) is store.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tasks import startup
from tasks.config import PipelineConfig, dataset_identity
from tasks.tracking import lineage, store, views
from tasks.workspace import Workspace, read_json, write_json

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests such runs under it
END_REASON = store.END_REASON  # why a run ended FAILED or KILLED
MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value is 8000
DIGEST_CHARS = 36  # MLflow's limit on a dataset digest; a DVC directory hash is 36


# Metric names: the MLflow UI draws a chart section per name prefix before "/", and the
# unprefixed ones (Keras' per-epoch loss, accuracy, val_loss, val_accuracy) first.
TEST_PREFIX = "test/"  # the headline test metrics: test/accuracy, test/loss, ...
LEGACY_TEST_PREFIX = "test_"  # how runs logged them before the sections


def test_metrics(headline: dict[str, float]) -> dict[str, float]:
    return {f"{TEST_PREFIX}{key}": value for key, value in headline.items()}


def test_metric(metrics: dict[str, float], name: str) -> float | None:
    """A run's headline test metric ``name``, under its current or its legacy name (runs
    of existing stores keep being compared, promoted against and reproduced)."""
    value = metrics.get(TEST_PREFIX + name)
    return metrics.get(LEGACY_TEST_PREFIX + name) if value is None else value


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI
EXPERIMENT_KIND = "custom_model_development"  # its "Machine learning" kind


def configure(cfg: PipelineConfig, ws: Workspace) -> str:
    """Point MLflow at the configured store and make sure the experiment exists.

    With a tracking server the server picks the artifact location (it proxies uploads),
    so clients on other machines need no access to its disk; with a local store,
    artifacts go to ``mlflow.artifact_root``.
    """
    import mlflow

    uri = store.tracking_uri(cfg.mlflow, ws.root)
    store.client_defaults()
    if store.is_server(uri):
        store.wait_for_server(uri)  # a dead server fails here, in bounded time
    elif store.is_database(uri):
        store.wait_for_database(uri)
    mlflow.set_tracking_uri(uri)
    with store.first_use_lock(uri):  # a new SQLite store's schema is created once
        client = mlflow.MlflowClient()
        if client.get_experiment_by_name(cfg.mlflow.experiment) is None:
            location = None
            if not store.is_server(uri):
                location = ws.resolve(cfg.mlflow.artifact_root).resolve().as_uri()
            try:
                # The MLflow 3 UI shows an experiment of this kind with the classic runs
                # table, charts and model views instead of its GenAI (traces) layout.
                client.create_experiment(
                    cfg.mlflow.experiment,
                    artifact_location=location,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            except mlflow.exceptions.MlflowException:
                # Another process created it between our lookup and create; theirs is fine.
                if client.get_experiment_by_name(cfg.mlflow.experiment) is None:
                    raise
    return uri


def end_orphans(cfg: PipelineConfig, keep: str | None = None) -> list[str]:
    """End KILLED the runs of this experiment left RUNNING by processes that are gone."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    ended = store.end_orphaned_runs(client, experiment.experiment_id, keep=keep)
    for run_id in ended:
        print(f"ended MLflow run {run_id} KILLED: its process was gone (orphaned)")
    return ended


def config_digest(cfg: PipelineConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.flat(), sort_keys=True).encode()).hexdigest()[:16]


def run_name(cfg: PipelineConfig, label: str) -> str:
    """What the runs table shows first: model family, dataset, and ``label`` (the Prefect
    flow run's name, so the two UIs point at each other, or a short random id)."""
    dataset = dataset_identity(cfg.data.source, cfg.data.name, cfg.data.classes)
    return f"{cfg.model.name}-{dataset}-{label}"


def source_tags(commit: str, origin: str) -> dict[str, str]:
    """MLflow's own tags for a run's "Created by" and "Source" (the UI's columns), which a
    run created through MlflowClient does not get by itself. ``origin``: what started it
    (``dvc repro``, ``python -m flows.pipeline``, a deployment's name)."""
    import getpass

    tags = {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": origin,
        "mlflow.source.type": "JOB" if origin.startswith("deployment") else "LOCAL",
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def start_pipeline_run(
    cfg: PipelineConfig,
    ws: Workspace,
    origin: str = "dvc repro",
    label: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Open a new pipeline run, log the resolved config, and write the handle file.

    ``origin`` says what started it (the run's Source), ``label`` ends its name
    (`run_name`); ``parent_run_id`` nests the run under another (a sweep's parent run).
    """
    import secrets

    import mlflow

    uri = configure(cfg, ws)
    end_orphans(cfg)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    commit = lineage.git_commit(ws.root)  # one `git status`: it reads every tracked file
    tags = source_tags(commit, origin) | {
        store.OWNER_TAG: store.owner(),
        "pipeline.git_commit": commit,
        "pipeline.dataset": "synthetic" if cfg.data.source == "synthetic" else cfg.data.name,
        "pipeline.config_digest": config_digest(cfg),
        "pipeline.workdir": str(ws.root),
        "pipeline.role": "sweep-point" if parent_run_id else "pipeline",
    }
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    name = run_name(cfg, label or secrets.token_hex(3))
    run = client.create_run(experiment.experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        params=[mlflow.entities.Param(k, str(v)) for k, v in sorted(cfg.flat().items())],
    )
    client.log_dict(run_id, cfg.model_dump(), "config/resolved_params.json")
    if tags["pipeline.git_commit"].endswith("-dirty"):  # rebuildable: keep what git lacks
        client.log_text(run_id, lineage.tracked_changes(ws.root), lineage.CHANGES_ARTIFACT)
    write_json(
        ws.run_handle,
        {"run_id": run_id, "tracking_uri": uri, "config_digest": config_digest(cfg)},
    )
    return run_id


def log_dataset(cfg: PipelineConfig, ws: Workspace) -> None:
    """The prepared data as the active run's MLflow dataset input (the runs table's Dataset
    column and the run page's Datasets): its name, the DVC hash of data/prepared as its
    digest (the version's data_version), and where it came from."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    data = cfg.data
    if data.source == "tfds":
        source = HTTPDatasetSource(f"https://www.tensorflow.org/datasets/catalog/{data.name}")
    elif data.source in ("idx", "text"):
        files = data.idx_dir if data.source == "idx" else data.text.path
        source = resolve_dataset_source(str(ws.resolve(files).resolve()))  # MLflow's "local"
    else:
        source = CodeDatasetSource({"generator": "tasks/images/data.py", "seed": str(data.seed)})
    dataset = MetaDataset(
        source,
        name=dataset_identity(data.source, data.name, data.classes),
        digest=lineage.dvc_hash(ws.prepared)[:DIGEST_CHARS],
    )
    mlflow.log_input(dataset, context="training")


def start_sweep_run(
    cfg: PipelineConfig, ws: Workspace, run_name: str, points: list[dict[str, Any]]
) -> str:
    """Open a sweep's parent run; the points' pipeline runs nest under it."""
    import mlflow

    configure(cfg, ws)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={
            "pipeline.role": "sweep",
            "pipeline.git_commit": lineage.git_commit(ws.root),
            store.OWNER_TAG: store.owner(),
        },
    )
    client.log_param(run.info.run_id, "sweep.points", len(points))
    client.log_dict(run.info.run_id, {"points": points}, "sweep/points.json")
    return run.info.run_id


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours Keras puts in its messages


def end_reason(text: str) -> str:
    """A run's end-reason tag: plain text (no terminal colour codes), cut to a tag's size."""
    return ANSI_ESCAPE.sub("", text)[:MAX_TAG_CHARS]


def end_run_quietly(run_id: str, status: str) -> None:
    """Close a run on the way out of a failure, without masking that failure."""
    import mlflow

    with suppress(Exception):
        mlflow.MlflowClient().set_terminated(run_id, status)


def _joinable_run(cfg: PipelineConfig, ws: Workspace, uri: str) -> str | None:
    import mlflow

    if not ws.run_handle.is_file():
        return None
    handle = read_json(ws.run_handle)
    if handle.get("tracking_uri") != uri or handle.get("config_digest") != config_digest(cfg):
        return None
    try:
        run = mlflow.MlflowClient().get_run(handle["run_id"])
    except mlflow.exceptions.MlflowException:
        return None
    # Between stages the run is FINISHED; RUNNING means a stage died (kill -9): resume it.
    return run.info.run_id if run.info.status in ("RUNNING", "FINISHED") else None


@contextmanager
def stage_run(
    cfg: PipelineConfig,
    ws: Workspace,
    stage: str,
    *,
    last: bool = False,
    run_id: str | None = None,
) -> Iterator[str]:
    """Make the pipeline run the active MLflow run while one stage executes.

    The run is RUNNING only while a stage executes (stamped with this process as its
    owner) and FINISHED between stages, so a pipeline that stops after any stage (a
    data-only `dvc repro`) leaves no run open; the handle lets the next stage reopen it.
    A failing stage marks it FAILED, a stop signal KILLED (the reason in a tag), and
    drops the handle so the next attempt starts clean. ``run_id`` joins that run instead
    (the export stage joins the run that registered the version it exports, also when
    only the export params changed and the stage runs alone).
    """
    import mlflow

    uri = configure(cfg, ws)
    run_id = run_id or _joinable_run(cfg, ws, uri)
    joined = run_id is not None
    end_orphans(cfg, keep=run_id)
    run_id = run_id or start_pipeline_run(cfg, ws)
    mlflow.start_run(run_id=run_id)
    mlflow.set_tag(store.OWNER_TAG, store.owner())
    if not joined:
        # Upstream stages were up to date and did not run: show their outputs here too,
        # so every pipeline run carries the data description and augmentation grid.
        log_upstream_outputs(ws, run_id)
    try:
        yield run_id
    except BaseException as error:
        if name := startup.stop_signal(error):
            reason = f"stopped by {name} in stage {stage}"
            _end_quietly("KILLED", tags={f"pipeline.stage.{stage}": "killed", END_REASON: reason})
            ws.run_handle.unlink(missing_ok=True)
            raise
        if store.is_transient(error):
            # Leave the run open and the handle in place: a retry of this stage joins it.
            _end_quietly("RUNNING")
            raise
        reason = end_reason(f"stage {stage}: {type(error).__name__}: {error}")
        _end_quietly("FAILED", tags={f"pipeline.stage.{stage}": "failed", END_REASON: reason})
        ws.run_handle.unlink(missing_ok=True)
        raise
    mlflow.set_tag(f"pipeline.stage.{stage}", "done")
    mlflow.end_run(status="FINISHED")
    if last:
        ws.run_handle.unlink(missing_ok=True)


def _end_quietly(status: str, tags: dict[str, str] | None = None) -> None:
    """End the active run with ``status``; never hide the stage's own error behind ours.

    mlflow.end_run pops the active run before it calls the server, so even when the
    server is unreachable the process is left with no active run.
    """
    import mlflow

    if tags:
        with suppress(Exception):
            mlflow.set_tags(tags)
    with suppress(Exception):
        mlflow.end_run(status=status)


def log_upstream_outputs(ws: Workspace, run_id: str) -> None:
    """Log the data and preprocess outputs already on disk to run ``run_id``.

    For runs whose earlier stages did not execute in this run (up to date under DVC,
    or skipped by the flow), so every run still shows its data and augmentation.
    """
    import mlflow

    client = mlflow.MlflowClient()
    if (meta := ws.prepared / "meta.json").is_file():
        client.log_artifact(run_id, str(meta), artifact_path="data")
        sizes = data_size_params(read_json(meta))
        with suppress(mlflow.exceptions.MlflowException):  # logged already: the same values
            client.log_batch(
                run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in sizes.items()]
            )
    for folder in (ws.preprocessed, ws.preprocess_reports):
        if folder.is_dir():
            client.log_artifacts(run_id, str(folder), artifact_path="preprocess")


def data_size_params(meta: dict[str, Any]) -> dict[str, int]:
    """The prepared splits' sizes as params (``data.train_examples``, ...): facts about the
    run's data, not measurements, so not single-value charts among the metrics."""
    return {f"data.{split}_examples": n for split, n in meta["counts"].items()}


def handle_run_id(ws: Workspace) -> str | None:
    """The pipeline run named in ``ws``'s handle file, if there is one."""
    return read_json(ws.run_handle)["run_id"] if ws.run_handle.is_file() else None


def end_pipeline_run(
    ws: Workspace, status: str, *, keep_handle: bool, reason: str | None = None
) -> None:
    """Close the run named in the handle unless already closed; FAILED and KILLED win over
    FINISHED (the state between stages), and ``reason`` goes into a tag.

    ``keep_handle`` leaves the handle file so the run can be reopened later for one more
    stage (a sweep registers its best point's run after all points have finished).
    """
    import mlflow

    run_id = handle_run_id(ws)
    if run_id is None:
        return
    client = mlflow.MlflowClient(tracking_uri=read_json(ws.run_handle)["tracking_uri"])
    current = client.get_run(run_id).info.status
    if current == "RUNNING" or (current == "FINISHED" and status != "FINISHED"):
        if reason:
            client.set_tag(run_id, END_REASON, end_reason(reason))
        client.set_terminated(run_id, status)
    if not keep_handle:
        ws.run_handle.unlink(missing_ok=True)


def reopen_pipeline_run(ws: Workspace) -> str:
    """The run named in the handle, for one more stage: stage_run joins a FINISHED run and
    marks it RUNNING (owned by its process) only while that stage executes."""
    run_id = handle_run_id(ws)
    if run_id is None:
        raise FileNotFoundError(f"{ws.run_handle} not found: no pipeline run to reopen")
    return run_id


def log_params_once(params: dict[str, Any]) -> None:
    """Params of the active run that a stage derives (not in params.yaml). A rerun of the
    stage joining the same run logs the same values; MLflow refuses a changed one, which
    then keeps the first (the run's config digest pins everything they derive from)."""
    import mlflow

    with suppress(mlflow.exceptions.MlflowException):
        mlflow.log_params(params)


def log_artifact_if_exists(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if path.is_file():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def run_url(run_id: str) -> dict[str, Any]:
    """Where to find the run: tracking URI, ids, and, when a server serves the store, its
    UI addresses (the run, and the experiment's runs table), in the Model training layout."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    run = mlflow.MlflowClient().get_run(run_id)
    experiment = run.info.experiment_id
    served = store.is_server(uri)
    return {
        "tracking_uri": uri,
        "experiment_id": experiment,
        "run_id": run_id,
        "ui_path": f"#/experiments/{experiment}/runs/{run_id}",
        "ui_url": views.run_url(uri, experiment, run_id) if served else None,
        "experiment_url": views.experiment_url(uri, experiment) if served else None,
    }
