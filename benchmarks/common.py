"""What the benchmarks share: result files, summaries, the machine, measured child processes.

Results are JSON files in benchmarks/results/ (benchmarks/results/quick/ in quick mode),
one per benchmark, each a list of rows keyed by ``row["key"]``. Rerunning one row's
command replaces that row and keeps the others, so every row's number is reproduced by
the command stored beside it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tasks import startup

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
RESULTS = REPO / "benchmarks" / "results"
PACKAGES = (
    "tensorflow",
    "keras",
    "nvidia-dali-cuda120",
    "nvidia-dali-tf-plugin-cuda120",
    "numpy",
    "prefect",
    "mlflow",
    "dvc",
)


# ------------------------------------------------------------------------ result files


def results_dir(quick: bool) -> Path:
    return RESULTS / "quick" if quick else RESULTS


def command(module: str, *args: str, quick: bool) -> str:
    """The command line printed beside a number: run from the repository root, venv active;
    with oneDNN turned off first where this run had it off (the pipeline's default is on)."""
    line = shlex.join(["python", "-m", module, *args, *(["--quick"] if quick else [])])
    return f"{startup.ONEDNN_ENV}=0 {line}" if onednn_setting() is False else line


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median with the min-max spread, keeping the raw values."""
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def load_average() -> float:
    """1-minute load average: on a 2-core machine, anything near 2 or above means contention."""
    return round(os.getloadavg()[0], 2)


def onednn_setting() -> bool | None:
    """Whether this run's TensorFlow processes use oneDNN's CPU kernels, as the environment
    says (every benchmark sets the pipeline's default first); None: TensorFlow decides from
    the CPU. They change a CPU training step's speed, so a row records them."""
    value = os.environ.get(startup.ONEDNN_ENV)
    return None if value is None else value.strip().lower() in ("1", "true")


def cpu_cell(row: dict[str, Any]) -> str:
    """A row's CPU for a table, with its oneDNN setting where the row recorded it."""
    onednn = {True: ", oneDNN on", False: ", oneDNN off"}.get(row.get("onednn"), "")
    return row.get("cpu", "not recorded") + onednn


def stamp_row(row: dict[str, Any], load_before: float) -> dict[str, Any]:
    """Add when and on which CPU the row was measured, and how busy the machine was around
    it: rows merge into one file across runs, whose ``machine`` is only the last run's."""
    return row | {
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "onednn": onednn_setting(),
        "load_avg_1min": {"before": load_before, "after": load_average()},
    }


def read_result(name: str, quick: bool) -> dict[str, Any] | None:
    path = results_dir(quick) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_rows(name: str, quick: bool, rows: Iterable[dict[str, Any]], **extra: Any) -> Path:
    """Merge ``rows`` into results/<name>.json by key; returns the file's path."""
    previous = read_result(name, quick) or {}
    merged = {row["key"]: row for row in previous.get("rows", [])}
    merged |= {row["key"]: row for row in rows}
    record = {
        "benchmark": name,
        "quick": quick,
        "machine": machine(),
        "code": {"git_commit": git_commit()},
        **extra,
        "rows": list(merged.values()),
    }
    path = results_dir(quick) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- machine


def _proc_field(path: str, prefix: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(prefix)), None)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_description() -> str:
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if listed.returncode == 0 and listed.stdout.strip():
            return listed.stdout.strip()
    return "none (no nvidia-smi and no usable NVIDIA device)"


def cpu_name() -> str:
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor()


def machine() -> dict[str, Any]:
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "gpu": gpu_description(),
    }


def git_commit() -> str:
    from tasks.tracking.lineage import git_commit as commit_of

    return commit_of(REPO)


# ---------------------------------------------------------------------- child processes


@dataclass(frozen=True)
class Measured:
    wall_s: float  # seconds, parent's clock around the child
    peak_rss_mib: float  # max RSS of the child or of its largest waited-for descendant
    log: Path  # the child's stdout and stderr


def child_env(scratch: Path, extra_path: Sequence[Path] = ()) -> dict[str, str]:
    """Environment of a measured child: this venv first on PATH (dvc.yaml's `python`),
    no outside MLflow store, and a Prefect home of its own under ``scratch``."""
    env = dict(os.environ)
    path = [*map(str, extra_path), str(Path(sys.executable).parent), env.get("PATH", "")]
    env["PATH"] = os.pathsep.join(path)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PREFECT_HOME"] = str(scratch / "prefect-home")
    return env


def run_measured(cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path) -> Measured:
    """Run ``cmd`` to completion; wall time and peak RSS from wait4 (no /usr/bin/time needed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"`{shlex.join(cmd)}` in {cwd} exited {proc.returncode}:\n{tail}")
    return Measured(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024, log=log)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def warm_prefect(scratch: Path) -> None:
    """Create the Prefect home's database once, so no measured run pays for the migration."""
    code = "import prefect; prefect.flow(name='bench-warmup')(lambda: None)()"
    env = child_env(scratch)
    run_measured([sys.executable, "-c", code], cwd=scratch, env=env, log=scratch / "warmup.log")


def copy_repo(dest: Path) -> Path:
    """A fresh git repository holding this checkout's files (tracked and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "benchmark copy"], cwd=dest, check=True)
    return dest


def set_params(root: Path, overrides: Mapping[str, Any]) -> None:
    """Write dotted-key overrides into ``root``/params.yaml, as a user editing it would."""
    path = root / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"params.yaml has no key {dotted!r}")
        node[leaf] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def as_cli_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """``{"train.epochs": 1}`` -> ``["train.epochs=1"]``, values written so that the CLI's
    YAML reading gives them back (plain where that holds, JSON otherwise)."""

    def text(value: Any) -> str:
        plain = str(value)
        return (
            plain
            if isinstance(value, str) and yaml.safe_load(plain) == value
            else json.dumps(value)
        )

    return [f"{key}={text(value)}" for key, value in overrides.items()]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def report_path(quick: bool) -> Path:
    return results_dir(True) / "BENCHMARKS.md" if quick else REPO / "BENCHMARKS.md"
