"""What a flow run shows in the Prefect UI: each stage's log, and a summary of the run.

Stages write to stdout (Keras prints one line per epoch) and to Python loggers (MLflow,
Prefect's run logger). While a stage runs as a task, its stdout lines become records of
the task run's logger (the flow run's Logs tab), and every record, with stderr, is
copied into a buffer whose tail becomes a markdown artifact of that task run.
The summary artifact (test metrics, registered version and aliases, links) is keyed, so
the Artifacts page keeps its history across runs.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from tasks.workspace import Workspace

LOG_TAIL_LINES = 200  # lines of each stage's output kept in its artifact
LOG_LINE_CHARS = 400  # longer lines are cut: artifacts are for reading, not archiving
# Loggers whose records go into the stage log: everything that propagates to the root,
# MLflow's own (it does not propagate), and Prefect's run loggers (prints land there).
CAPTURED_LOGGERS = ("", "mlflow", "prefect.task_runs", "prefect.flow_runs")
SUMMARY_KEY = "pipeline-summary"


class _Tee:
    """A text stream that writes to the original stream and to a buffer.

    Everything else (fileno, encoding, isatty, ...) is the original stream's, so code that
    inspects sys.stdout sees what it would see without the copy.
    """

    def __init__(self, stream: TextIO, buffer: io.StringIO) -> None:
        self._stream, self._buffer = stream, buffer

    def write(self, text: str) -> int:
        self._buffer.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, cursor moves


class _LinesToLogger:
    """sys.stdout while a stage runs as a Prefect task: each complete line (Keras' epoch
    lines) becomes a record of the task run's logger, so it shows in the flow run's Logs
    tab, and Prefect's console handler prints it on the terminal (once)."""

    def __init__(self, stream: TextIO, logger: Any) -> None:
        self._stream, self._logger, self._partial = stream, logger, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            line = ANSI_ESCAPE.sub("", line).rpartition("\r")[2]  # a bar's last redraw
            if line.strip():
                self._logger.info(line)
        return len(text)

    def close_line(self) -> None:
        if self._partial:
            self.write("\n")

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _OncePerRecord(logging.StreamHandler):
    """Attached to several loggers of one chain (a task run's logger propagates to the
    root), it would write a record once per logger: it writes each record once."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._last: logging.LogRecord | None = None

    def handle(self, record: logging.LogRecord) -> bool:
        if record is self._last:
            return False
        self._last = record
        return super().handle(record)


def _run_logger() -> Any:
    """The Prefect task run's logger, or None outside a task run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return None


@dataclass
class StageReport:
    name: str
    buffer: io.StringIO = field(default_factory=io.StringIO)
    started: float = field(default_factory=time.monotonic)

    def tail(self) -> str:
        """The last lines, without terminal colour codes and progress-bar redraws."""
        text = ANSI_ESCAPE.sub("", self.buffer.getvalue())
        # split("\n"), not splitlines(): a bar's "\r" redraws stay on its line, last one wins
        lines = [line.rpartition("\r")[2] for line in text.rstrip("\n").split("\n")]
        lines = lines[-LOG_TAIL_LINES:]
        return "\n".join(line[:LOG_LINE_CHARS] for line in lines)


@contextmanager
def captured_stage_log(name: str) -> Iterator[StageReport]:
    """Copy stdout, stderr and log records into a report while stage ``name`` runs.

    The report becomes an artifact of the task run whether the stage succeeds or fails;
    the artifact never replaces the stage's own error.
    """
    report = StageReport(name)
    handler = _OncePerRecord(report.buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in CAPTURED_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    stdout, stderr = sys.stdout, sys.stderr
    logger = _run_logger()
    # In a task run, stdout lines become log records (the handler above keeps them).
    sys.stdout = _LinesToLogger(stdout, logger) if logger else _Tee(stdout, report.buffer)
    sys.stderr = _Tee(stderr, report.buffer)
    outcome = "failed"
    try:
        yield report
        outcome = "completed"
    finally:
        if isinstance(sys.stdout, _LinesToLogger):
            sys.stdout.close_line()
        sys.stdout, sys.stderr = stdout, stderr
        for logger in loggers:
            logger.removeHandler(handler)
        _publish_stage_log(report, outcome)


def _publish_stage_log(report: StageReport, outcome: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    seconds = time.monotonic() - report.started
    fence = "~~~~"  # stage output may contain ``` itself
    markdown = (
        f"### Stage `{report.name}`: {outcome} in {seconds:.1f} s\n\n"
        f"Last {LOG_TAIL_LINES} lines of its output:\n\n{fence}text\n{report.tail()}\n{fence}\n"
    )
    try:
        create_markdown_artifact(  # keyed: a title in the UI, and a history per stage
            key=f"stage-log-{report.name}",
            markdown=markdown,
            description=f"{report.name} stage log ({outcome})",
        )
    except Exception as error:  # reporting must never fail the stage
        print(f"could not publish the {report.name} stage log: {error}", file=sys.stderr)


def publish_pipeline_summary(
    ws: Workspace, run_id: str, metrics: dict | None, record: dict | None
) -> str:
    """Publish the run summary artifact (keyed, so the Artifacts page keeps its history)."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    uri = mlflow.get_tracking_uri()
    run = mlflow.MlflowClient().get_run(run_id)
    links = ui_links(uri, run, record)
    rows = [
        ("Prefect flow run", _link(flow_run.get_name() or "-", flow_run.ui_url)),
        ("Outputs", f"`{ws.root}`"),
        ("MLflow run", _link(run_id, links["run"])),
        ("MLflow experiment", _link(run.info.experiment_id, links["experiment"])),
        ("Tracking URI", f"`{uri}`"),
    ]
    params = run.data.params
    if (
        "train.replicas_in_sync" in params
    ):  # logged by the train stage (tasks/training/distribute.py)
        rows.append(
            (
                "Trained on",
                f"{params['train.replicas_in_sync']} replica(s) "
                f"({params.get('train.distribute')}), global batch "
                f"{params['train.global_batch_size']}",
            )
        )
    if metrics:  # the headline: images' accuracy, loss, macro F1; text's perplexity, ...
        rows += [
            (f"Test {key.replace('_', ' ')}", f"{value:.4f}")
            for key, value in metrics["test"].items()
        ]
    if record:
        rows += [
            ("Registered", _link(f"{record['model_name']} v{record['version']}", links["model"])),
            ("Aliases", ", ".join(record["aliases"])),
            ("Champion", f"v{record['champion_version']}"),
            ("Data version (DVC md5)", f"`{record['data_version']}`"),
            ("Git commit", f"`{record['git_commit']}`"),
        ]
    else:
        rows.append(("Registered", "no: the register stage did not run in this flow run"))
    if exports := (record or {}).get("exports"):
        for variant, row in exports["formats"].items():
            parity = f"max diff {row['max_abs_diff']:.2g}, accuracy {row['accuracy']:.4f}"
            rows.append((f"Export {variant}", parity))
    markdown = "## Training pipeline summary\n\n" + markdown_table(rows, ("Run", "Value"))
    if ws.samples.is_file():  # a language model's generated text
        markdown += "\n\n## Generated samples\n\n```text\n" + ws.samples.read_text() + "```\n"
    create_markdown_artifact(key=SUMMARY_KEY, markdown=markdown, description="Run summary")
    return markdown


def markdown_table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "Value")) -> str:
    """A two-column table; ``header`` names the columns (Prefect's UI draws an empty header
    row as a blank bar above the table)."""
    body = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"| {header[0]} | {header[1]} |\n|---|---|\n{body}\n"


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else f"`{text}`"


def ui_links(tracking_uri: str, run: Any, record: dict | None) -> dict[str, str | None]:
    """MLflow UI addresses (Model training layout) of the run, its experiment's runs table
    and the registered version; None without a server."""
    from tasks.tracking import views

    if not tracking_uri.startswith(("http://", "https://")):
        return {"run": None, "experiment": None, "model": None}
    experiment = run.info.experiment_id
    return {
        "run": views.run_url(tracking_uri, experiment, run.info.run_id),
        "experiment": views.experiment_url(tracking_uri, experiment),
        "model": record
        and views.model_version_url(tracking_uri, record["model_name"], record["version"]),
    }


def outcome_line(record: dict[str, Any]) -> str:
    """The result a long command ends with (`dvc repro`, `make smoke`, a deployment run
    watched with `--watch`): test accuracy, the version and its aliases, where the run is."""
    mlflow = record.get("mlflow") or {}
    where = mlflow.get("ui_url") or f"run {record['run_id']} in {mlflow.get('tracking_uri')}"
    return (
        f"test accuracy {record['test_accuracy']:.4f}; registered {record['model_name']} "
        f"version {record['version']} ({', '.join(record['aliases'])}); MLflow: {where}"
    )
