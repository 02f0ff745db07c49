"""Where the MLflow UI should open, and what its runs table shows there.

MLflow 3's UI starts a new browser in its GenAI layout (traces, sessions); the runs
table, charts and model registry are its "Model training" layout, chosen per browser
and stored in the browser, with no server-side default. A link with
``workflowType=machine_learning`` opens that layout whatever the browser chose before,
so every link the pipeline prints carries it.

The runs table's columns are UI state too. MLflow keeps a saved view ("Views" above the
table) as an experiment tag ``mlflow.sharedViewState.<key>``; the pipeline keeps one,
"Pipeline runs", showing the headline test metrics and the params that differ between
the experiment's runs, refreshed by each run that registers a version, and its links
open the table with it.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Iterable
from typing import Any

MODEL_TRAINING = "workflowType=machine_learning"  # the UI's "Model training" layout
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the MLflow UI's saved views
VIEW_KEY = "pipeline-runs"
VIEW_NAME = "Pipeline runs"
MAX_PARAM_COLUMNS = 8  # params shown beside the metrics; more scroll off a laptop screen
# Columns MLflow shows by default that a run of this pipeline fills (Source: what started
# it; Models: the registered version; Dataset: the prepared data's name and DVC hash).
ATTRIBUTE_COLUMNS = ("attributes.`Dataset`", "attributes.`Source`", "attributes.`Models`")
# Params that differ between runs without telling them apart for a person.
NOT_COMPARED = ("mlflow.", "class_names", "train.replicas_in_sync", "train.global_batch_size")
FIRST_PARAMS = ("model.name", "data.source")  # shown first when they differ


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, in the Model training layout, with the saved view."""
    return (
        f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?{MODEL_TRAINING}&viewStateShareKey={VIEW_KEY}"
    )


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"


def model_version_url(base: str, name: str, version: str) -> str:
    return f"{base.rstrip('/')}/#/models/{name}/versions/{version}?{MODEL_TRAINING}"


def differing_params(runs: Iterable[dict[str, str]]) -> list[str]:
    """Param keys whose values differ between the runs (a key some runs lack differs);
    ``model.name`` and ``data.source`` first, then by name; at most MAX_PARAM_COLUMNS."""
    runs = list(runs)
    keys = {key for params in runs for key in params if not key.startswith(NOT_COMPARED)}
    differ = [key for key in keys if len({params.get(key) for params in runs}) > 1]
    ordered = sorted(differ, key=lambda key: (key not in FIRST_PARAMS, key))
    return ordered[:MAX_PARAM_COLUMNS]


def view_state(metric_keys: list[str], param_keys: list[str]) -> dict[str, Any]:
    """The runs-table state MLflow 3.17's UI saves for a view: newest first, and these
    columns beside the default ones."""
    return {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [
            *ATTRIBUTE_COLUMNS,
            *(f"metrics.`{key}`" for key in metric_keys),
            *(f"params.`{key}`" for key in param_keys),
        ],
        "runsHiddenMode": "FIRST_10_RUNS",
        "hideEmptyCharts": True,
    }


def view_tag_value(state: dict[str, Any], created_ms: int | None = None) -> str:
    """A saved view as the UI writes it: its name and times, and the state deflated and
    base64-encoded (``deflate;...``, the UI's own encoding, read back by the UI)."""
    now = int(time.time() * 1000)
    packed = base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    return json.dumps(
        {
            "name": VIEW_NAME,
            "createdAt": created_ms or now,
            "updatedAt": now,
            "state": f"deflate;{packed}",
        }
    )


def read_view_state(tag_value: str) -> dict[str, Any]:
    """The state inside a saved view's tag value (tests and tools read the view back)."""
    state = json.loads(tag_value)["state"]
    encoding, _, packed = state.partition(";")
    if encoding != "deflate":
        raise ValueError(f"unknown saved-view encoding {encoding!r}")
    return json.loads(zlib.decompress(base64.b64decode(packed)))


def refresh_runs_view(client: Any, experiment_id: str, metric_keys: list[str]) -> list[str]:
    """Rewrite the experiment's "Pipeline runs" view from its latest pipeline runs: the
    headline ``metric_keys`` and the params that differ. Returns the param columns."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.`pipeline.role` = 'pipeline'",
        max_results=100,
        order_by=["attributes.start_time DESC"],
    )
    params = differing_params(run.data.params for run in runs) or ["model.name"]
    experiment = client.get_experiment(experiment_id)
    previous = experiment.tags.get(VIEW_TAG_PREFIX + VIEW_KEY)
    created = json.loads(previous)["createdAt"] if previous else None
    value = view_tag_value(view_state(metric_keys, params), created)
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, value)
    return params
