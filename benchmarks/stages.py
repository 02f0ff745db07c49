"""Stage wall time and peak RSS of a full synthetic CIFAR-sized run, orchestration overhead,
and the time of a `dvc repro` that has nothing to do.

Each repeat runs the same work four ways (order rotated between repeats):

* ``dvc``: `dvc repro` in a fresh git copy of this repository with params.yaml shrunk
  as below; every stage is a `python -m flows.stage <stage>` process (the stages after
  the first hand their work to the stage host, flows/stagehost.py), and a `python` shim
  first on PATH records each stage process's wall time and peak RSS (a hosted stage's
  peak RSS: the host's, from its log). Then `dvc repro` again, several times, with
  nothing changed (the no-op benchmark).
* ``dvc_per_process``: the same with PIPELINE_STAGE_HOST=0: every stage in its own process.
* ``prefect``: `python -m flows.pipeline` in another fresh copy (one process, Prefect's
  ephemeral API, MLflow run, model logged and registered).
* ``bare``: the same work with no orchestration or tracking, in one process: the pure
  stage cores (prepare + write data, channel stats + augmented grid, train_model with
  only the CSV history callback + model.save, predict + metrics + reports, raw-pixel
  wrapper saved as .keras), writing the same output files.

Overhead = orchestrated wall - bare wall, per repeat: it holds Prefect/DVC bookkeeping,
MLflow logging and model registration, and (DVC) one Python start + imports per stage
process, plus stages re-reading their inputs from disk.

    python -m benchmarks.stages [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PARAMS,
    REPO,
    as_cli_overrides,
    child_env,
    command,
    copy_repo,
    load_average,
    log,
    python_module,
    run_measured,
    set_params,
    stamp_row,
    summarize,
    warm_prefect,
    write_rows,
)
from benchmarks.markdown import code, load, missing, spread, table, verdict
from tasks import startup

MODES = ("bare", "prefect", "dvc", "dvc_per_process")  # dvc: with the stage host
# The stages the bare run mirrors; export (format conversions, no orchestration question)
# is left out of all three modes: `dvc repro register`, `flows.pipeline --stages ...`.
STAGES = ("data", "preprocess", "train", "evaluate", "register")
TARGET_TIMES_BARE = {"prefect": 1.25, "dvc": 1.5}  # wall / bare on this workload (issue goals)
SIZES = {
    False: {  # 50k/10k synthetic 32x32x3, one epoch; 10% of train is held out for validation
        "overrides": {
            "data.source": "synthetic",
            "data.synthetic.train_size": 50_000,
            "data.synthetic.test_size": 10_000,
            "train.epochs": 1,
        },
        "repeats": 3,
        "noop_repeats": 5,
        "data_totals": [15_000, 30_000, 60_000],
    },
    True: {
        "overrides": {
            "data.source": "synthetic",
            "data.synthetic.train_size": 1_200,
            "data.synthetic.test_size": 300,
            "train.epochs": 1,
            "preprocess.grid_samples": 16,
        },
        "repeats": 1,
        "noop_repeats": 2,
        "data_totals": [1_500, 3_000, 6_000],
    },
}
# What a stage process imports before any work (train, evaluate and register import all of it).
STARTUP_IMPORTS = "import mlflow, keras, tensorflow, nvidia.dali.plugin.tf"

SHIM = '''#!{python}
"""`python` for dvc.yaml's stage commands: runs the real one, logs wall time and peak RSS."""
import json, os, sys, time

start = time.perf_counter()
pid = os.fork()
if pid == 0:
    flags = []
    if os.environ.get("BENCH_IMPORT_DIR"):  # -X importtime, the stage's stderr to a file
        name = os.path.join(os.environ["BENCH_IMPORT_DIR"], sys.argv[-1] + ".log")
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        flags = ["-X", "importtime"]
    os.execv({python!r}, [{python!r}, *flags, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
with open(os.environ["BENCH_STAGE_LOG"], "a") as log:
    record = {{"argv": sys.argv[1:], "wall_s": time.perf_counter() - start,
              "peak_rss_mib": usage.ru_maxrss / 1024}}
    log.write(json.dumps(record) + "\\n")
sys.exit(os.waitstatus_to_exitcode(status))
'''


# ------------------------------------------------------------------- bare (no orchestration)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_pipeline(cfg: Any, root: Path) -> dict[str, dict[str, float]]:
    """Run the pipeline's work in this process; per step: seconds and peak RSS so far (MiB)."""
    steps: dict[str, dict[str, float]] = {}
    clock = time.perf_counter()

    def done(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        steps[step] = {"wall_s": now - clock, "peak_rss_mib": peak_rss_mib()}
        clock = now

    import keras
    import numpy as np

    from tasks.images import augment, data, evaluate
    from tasks.models.wrap import with_normalization
    from tasks.stages import train
    from tasks.workspace import Workspace, atomic_path, write_json

    done("imports")
    ws = Workspace(root)
    dataset = data.prepare_dataset(cfg.data, ws.root)
    data.write_prepared(dataset, ws.prepared, cfg.data)
    done("data")

    images, labels = dataset.split("train")
    stats = augment.channel_stats(images)
    count = min(cfg.preprocess.grid_samples, len(images))
    samples = augment.sample_augmented(images, stats, cfg.preprocess, count, seed=0)
    augment.save_image_grid(
        samples, stats.mean, stats.std, ws.augmented_grid, dataset.class_names, labels[:count]
    )
    write_json(ws.norm_stats, stats._asdict())
    done("preprocess")

    with atomic_path(ws.history) as history:
        model, _ = train.train_model(
            cfg,
            dataset.split("train"),
            dataset.split("val"),
            dataset.num_classes,
            stats,
            [keras.callbacks.CSVLogger(str(history))],
        )
    ws.model_file.parent.mkdir(parents=True, exist_ok=True)
    model.save(ws.model_file)
    done("train")

    test_images, test_labels = dataset.split("test")
    logits = evaluate.predict_logits(model, test_images, test_labels, stats, cfg)
    metrics = evaluate.compute_metrics(logits, test_labels, list(dataset.class_names))
    predicted = logits.argmax(axis=1)
    names = list(dataset.class_names)
    evaluate.save_confusion_matrix(test_labels, predicted, names, ws.confusion_png)
    evaluate.write_predictions(test_labels, predicted, names, ws.predictions)
    write_json(ws.metrics, metrics)
    done("evaluate")

    raw = with_normalization(model, stats.mean, stats.std, cfg.evaluate.tta_flip)
    raw.predict(test_images[:4].astype(np.float32), verbose=0)  # what the signature needs
    raw.save(ws.model_file.with_name("model_raw_pixels.keras"))
    done("register")
    return steps


# ------------------------------------------------------------------------- measured modes


def run_bare(scratch: Path, name: str, quick: bool) -> dict[str, Any]:
    root, out = scratch / name, scratch / f"{name}.json"
    root.mkdir()
    args = ["--worker-bare", str(root), "--out", str(out), *(["--quick"] if quick else [])]
    measured = run_measured(
        python_module("benchmarks.stages", *args),
        cwd=REPO,
        env=child_env(scratch),
        log=scratch / f"{name}.log",
    )
    steps = json.loads(out.read_text())
    return {"wall_s": measured.wall_s, "peak_rss_mib": measured.peak_rss_mib, "steps": steps}


def run_prefect(scratch: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    root = copy_repo(scratch / name)
    set_params(root, overrides)
    measured = run_measured(
        [*python_module("flows.pipeline"), "--stages", *STAGES],
        cwd=root,
        env=child_env(scratch),
        log=root / "bench.log",
    )
    return {"wall_s": measured.wall_s, "peak_rss_mib": measured.peak_rss_mib}


def write_shim(scratch: Path) -> Path:
    shim_dir = scratch / "shim"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "python"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    return shim_dir


def run_dvc(
    scratch: Path, name: str, overrides: dict[str, Any], noops: int, host: bool = True
) -> dict[str, Any]:
    """`dvc repro` from scratch, per-stage numbers from the shim, then ``noops`` no-op repros.

    ``host``: as users run it, the stages after the first in the stage host
    (flows/stagehost.py), whose log gives their peak RSS (the stage processes only wait);
    else every stage in its own process (PIPELINE_STAGE_HOST=0)."""
    root = copy_repo(scratch / name)
    set_params(root, overrides)
    stage_log = scratch / f"{name}-stages.jsonl"
    env = child_env(scratch, extra_path=[write_shim(scratch)]) | {"BENCH_STAGE_LOG": str(stage_log)}
    host_tmp = scratch / f"{name}-tmp"  # the host's socket and log, found below
    host_tmp.mkdir()
    env |= {"TMPDIR": str(host_tmp)} | ({} if host else {"PIPELINE_STAGE_HOST": "0"})
    dvc = [str(Path(sys.executable).parent / "dvc"), "repro", STAGES[-1]]
    measured = run_measured(dvc, cwd=root, env=env, log=root / "bench-repro.log")
    stages = {}
    for line in stage_log.read_text().splitlines():
        record = json.loads(line)
        if record["argv"][:2] == ["-m", "flows.stage"]:
            stages[record["argv"][2]] = {k: record[k] for k in ("wall_s", "peak_rss_mib")}
    if list(stages) != list(STAGES):
        raise RuntimeError(f"dvc repro ran stages {list(stages)}, expected {list(STAGES)}")
    hosted = hosted_stages(host_tmp)
    if host and list(hosted) != list(STAGES[1:]):
        raise RuntimeError(f"the stage host ran {list(hosted)}, expected {list(STAGES[1:])}")
    for stage, peak in hosted.items():
        stages[stage]["peak_rss_mib"] = peak
    noop_s = []
    for i in range(noops):
        again = run_measured(dvc, cwd=root, env=env, log=root / f"bench-noop-{i}.log")
        if "Running stage" in again.log.read_text():
            raise RuntimeError(f"a no-op dvc repro ran a stage; see {again.log}")
        noop_s.append(again.wall_s)
    return {
        "wall_s": measured.wall_s,
        "peak_rss_mib": max([measured.peak_rss_mib, *hosted.values()]),
        "stages": stages,
        "noop_s": noop_s,
    }


def hosted_stages(tmp: Path) -> dict[str, float]:
    """Stage -> the host's peak RSS after it (MiB), from the stage host's log lines
    ("ran train in DIR: exit 0, 3.1 s, peak RSS 1234 MiB")."""
    found = {}
    for host_log in tmp.glob("gpu-train-pipeline-stagehost-*/*.log"):
        for line in host_log.read_text().splitlines():
            if line.startswith("ran ") and "peak RSS" in line:
                found[line.split()[1]] = float(line.rsplit("peak RSS ", 1)[1].split()[0])
    return found


def import_profile(scratch: Path, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each stage process imports, from ``python -X importtime`` in one tiny `dvc
    repro` (imports do not depend on the data size): the seconds its imports take in
    all, and whether it loads TensorFlow or Prefect."""
    root = copy_repo(scratch / "imports")
    set_params(root, overrides)
    folder = scratch / "importtime"
    folder.mkdir()
    env = child_env(scratch, extra_path=[write_shim(scratch)]) | {
        "BENCH_STAGE_LOG": str(scratch / "imports-stages.jsonl"),
        "BENCH_IMPORT_DIR": str(folder),
        "PIPELINE_STAGE_HOST": "0",  # what each stage would import by itself
    }
    dvc = [str(Path(sys.executable).parent / "dvc"), "repro", STAGES[-1]]
    run_measured(dvc, cwd=root, env=env, log=root / "bench-repro.log")
    profile = {}
    for stage in STAGES:
        top_level: dict[str, int] = {}
        for line in (folder / f"{stage}.log").read_text(errors="replace").splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            _, cumulative, package = line.split("|", 2)
            if not package[1:].startswith(" "):  # not nested under another import
                top_level[package.strip()] = int(cumulative)
        profile[stage] = {
            "import_s": sum(top_level.values()) / 1e6,
            "tensorflow": "tensorflow" in top_level or "keras" in top_level,
            "prefect": "prefect" in top_level,
            "heaviest": sorted(top_level, key=top_level.get, reverse=True)[:4],
        }
    shutil.rmtree(root, ignore_errors=True)
    return profile


def data_stage_rss(scratch: Path, totals: list[int]) -> list[dict[str, Any]]:
    """`python -m flows.stage data` alone on synthetic 32x32x3 sets of ``totals`` images
    (5/6 train, 1/6 test): wall time and peak RSS, to see how memory grows with data."""
    rows = []
    for total in totals:
        root = scratch / f"data-{total}"
        root.mkdir()
        (root / "params.yaml").write_text(PARAMS.read_text())
        sizes = {"train_size": total * 5 // 6, "test_size": total // 6}
        set_params(
            root,
            {"data.source": "synthetic"} | {f"data.synthetic.{k}": v for k, v in sizes.items()},
        )
        measured = run_measured(
            python_module("flows.stage", "data"),
            cwd=root,
            env=child_env(scratch) | {"PYTHONPATH": str(REPO)},
            log=scratch / f"data-{total}.log",
        )
        rows.append(
            {"images": total, "wall_s": measured.wall_s, "peak_rss_mib": measured.peak_rss_mib}
        )
        shutil.rmtree(root, ignore_errors=True)
    return rows


def run_startup(scratch: Path, name: str) -> dict[str, float]:
    measured = run_measured(
        [sys.executable, "-c", STARTUP_IMPORTS],
        cwd=REPO,
        env=child_env(scratch),
        log=scratch / f"{name}.log",
    )
    return {"wall_s": measured.wall_s, "peak_rss_mib": measured.peak_rss_mib}


# ------------------------------------------------------------------------------ summary


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-repeat results of the three modes -> medians, spreads and overheads."""

    def over(path: list[str]) -> dict[str, Any]:
        values = []
        for run in runs:
            node = run
            for part in path:
                node = node[part]
            values.append(node)
        return summarize(values)

    summary: dict[str, Any] = {mode: {} for mode in MODES}
    for mode in MODES:
        summary[mode]["wall_s"] = over([mode, "wall_s"])
        summary[mode]["peak_rss_mib"] = over([mode, "peak_rss_mib"])
    summary["bare"]["steps"] = {
        step: {key: over(["bare", "steps", step, key]) for key in ("wall_s", "peak_rss_mib")}
        for step in runs[0]["bare"]["steps"]
    }
    for mode in ("dvc", "dvc_per_process"):
        summary[mode]["stages"] = {
            stage: {key: over([mode, "stages", stage, key]) for key in ("wall_s", "peak_rss_mib")}
            for stage in STAGES
        }
    summary["startup_imports"] = {k: over(["startup", k]) for k in ("wall_s", "peak_rss_mib")}
    overhead: dict[str, Any] = {}
    for mode in ("prefect", "dvc", "dvc_per_process"):
        extra = [run[mode]["wall_s"] - run["bare"]["wall_s"] for run in runs]
        percent = [100 * e / run[mode]["wall_s"] for e, run in zip(extra, runs, strict=True)]
        ratio = [run[mode]["wall_s"] / run["bare"]["wall_s"] for run in runs]
        overhead[mode] = {
            "seconds": summarize(extra),
            "percent_of_wall": summarize(percent),
            "times_bare": summarize(ratio),
        }
    stage_sums = [sum(s["wall_s"] for s in run["dvc"]["stages"].values()) for run in runs]
    overhead["dvc_own_s"] = summarize(
        [run["dvc"]["wall_s"] - total for run, total in zip(runs, stage_sums, strict=True)]
    )
    overhead["dvc_stage_processes_s"] = summarize(
        [total - run["bare"]["wall_s"] for run, total in zip(runs, stage_sums, strict=True)]
    )
    summary["overhead"] = overhead
    return summary


def run_repeats(scratch: Path, quick: bool) -> list[dict[str, Any]]:
    """Every repeat: import cost, then the three modes in an order rotated per repeat."""
    size = SIZES[quick]
    warm_prefect(scratch)
    runs = []
    for repeat in range(size["repeats"]):
        run: dict[str, Any] = {"startup": run_startup(scratch, f"startup-{repeat}")}
        for mode in MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]:
            name = f"{mode}-{repeat}"
            if mode == "bare":
                run[mode] = run_bare(scratch, name, quick)
            elif mode == "prefect":
                run[mode] = run_prefect(scratch, name, size["overrides"])
            else:
                noops = size["noop_repeats"] if mode == "dvc" else 0
                run[mode] = run_dvc(scratch, name, size["overrides"], noops, mode == "dvc")
            shutil.rmtree(scratch / name, ignore_errors=True)  # full size: ~0.5 GB per copy
            log(f"stages repeat {repeat + 1} {mode}: {run[mode]['wall_s']:.1f} s")
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stages")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results/quick/")
    parser.add_argument("--worker-bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    startup.prepare_process()  # the pipeline's defaults (oneDNN on), for children too
    size = SIZES[args.quick]
    if args.worker_bare:
        from tasks.config import load_config

        steps = bare_pipeline(load_config(PARAMS, size["overrides"]), args.worker_bare)
        args.out.write_text(json.dumps(steps))
        return 0

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        runs = run_repeats(Path(tmp), args.quick)
        imports = import_profile(Path(tmp), SIZES[True]["overrides"])
        data_rss = data_stage_rss(Path(tmp), size["data_totals"])

    overrides = as_cli_overrides(size["overrides"])
    row = stamp_row(
        {
            "key": "synthetic_cifar_sized",
            "overrides": size["overrides"],
            "repeats": size["repeats"],
            **summarize_runs(runs),
            "runs": runs,
            "command": command("benchmarks.stages", quick=args.quick),
            "equivalent_commands": {
                "dvc": "dvc repro register  # with params.yaml set to the overrides",
                "prefect": " ".join(["python -m flows.pipeline", *overrides, "--stages", *STAGES]),
            },
            "target_times_bare": TARGET_TIMES_BARE,
            "imports": imports,
            "data_stage_rss": data_rss,
            "target_data_rss_mib": 1024,
        },
        load_before,
    )
    write_rows("stages", args.quick, [row])
    noop = [s for run in runs for s in run["dvc"]["noop_s"]]
    noop_row = {
        "key": "synthetic_cifar_sized",
        "seconds": summarize(noop),
        "target_s": 1.0,
        "command": command("benchmarks.stages", quick=args.quick),
        "what": "`dvc repro` right after a full one, nothing changed (all stages skipped)",
    }
    write_rows("dvc_noop", args.quick, [stamp_row(noop_row, load_before)])
    return 0


def stages_section(result: dict[str, Any] | None, quick: bool) -> str:
    text = """## 3. Stage wall time, peak RSS and orchestration overhead

A full synthetic run, one epoch (10% of the training images are held out for validation).
Each repeat does the same work four ways, in an order rotated per repeat: `dvc repro` in a
fresh git copy as users run it (each stage a process, a `python` shim first on PATH timing
each; the stages after the first run in the stage host, `flows/stagehost.py`), the same
with `PIPELINE_STAGE_HOST=0` (every stage in its own process: the design before the host),
the Prefect flow `python -m flows.pipeline` in another copy, and *bare*: the pure stage
cores in one process with no Prefect, MLflow or DVC, writing the same output files (the
register step only wraps the model for raw pixels and saves it as .keras). Peak RSS is the
largest process's maximum resident set (wait4; for a stage in the host, the host's own
peak so far, from its log).

"""
    if not result:
        return text + missing("stages", quick)
    row = result["rows"][0]
    sizes = ", ".join(f"{k}={v}" for k, v in row["overrides"].items())
    text += f"Params: {code(sizes)}. Load {load(row)}. Command: {code(row['command'])}\n"
    by_hand = row["equivalent_commands"]
    text += f"(By hand: {code(by_hand['dvc'])}; {code(by_hand['prefect'])}.)\n\n"
    dvc, alone, bare = row["dvc"]["stages"], row["dvc_per_process"]["stages"], row["bare"]["steps"]
    rows = []
    for stage in ("imports", "data", "preprocess", "train", "evaluate", "register"):
        under_dvc, by_itself = dvc.get(stage), alone.get(stage)
        rows.append(
            [
                stage,
                spread(under_dvc["wall_s"], "{:.1f}") if under_dvc else "-",
                spread(under_dvc["peak_rss_mib"]) if under_dvc else "-",
                spread(by_itself["wall_s"], "{:.1f}") if by_itself else "-",
                spread(by_itself["peak_rss_mib"]) if by_itself else "-",
                spread(bare[stage]["wall_s"], "{:.1f}"),
                f"{bare[stage]['peak_rss_mib']['median']:,.0f}",
            ]
        )
    headers = [
        "stage",
        "dvc repro: s",
        "peak RSS MiB",
        "a process per stage: s",
        "peak RSS MiB",
        "bare, in-process: s",
        "bare peak RSS so far MiB",
    ]
    text += table(headers, rows) + "\n\n"
    alone = row["dvc_per_process"]
    totals = [
        ["dvc repro", spread(row["dvc"]["wall_s"], "{:.1f}"), spread(row["dvc"]["peak_rss_mib"])],
        [
            "dvc repro, a process per stage",
            spread(alone["wall_s"], "{:.1f}"),
            spread(alone["peak_rss_mib"]),
        ],
        [
            "Prefect flow",
            spread(row["prefect"]["wall_s"], "{:.1f}"),
            spread(row["prefect"]["peak_rss_mib"]),
        ],
        ["bare", spread(row["bare"]["wall_s"], "{:.1f}"), spread(row["bare"]["peak_rss_mib"])],
    ]
    text += table(["whole run", "wall s", "peak RSS MiB"], totals) + "\n\n"
    over = row["overhead"]
    targets = row["target_times_bare"]
    modes = (
        ("Prefect flow", "prefect"),
        ("dvc repro", "dvc"),
        ("dvc repro, a process per stage", "dvc_per_process"),
    )
    rows = [
        [
            name,
            spread(over[key]["seconds"], "{:.1f}"),
            spread(over[key]["percent_of_wall"], "{:.1f}"),
            spread(over[key]["times_bare"], "{:.2f}"),
            f"<= {targets[key]:g}" if key in targets else "-",
            verdict(over[key]["times_bare"]["median"] <= targets[key]) if key in targets else "",
        ]
        for name, key in modes
    ]
    headers = ["overhead vs bare", "seconds", "% of wall", "wall / bare", "target", ""]
    text += table(headers, rows)
    startup = row["startup_imports"]["wall_s"]
    text += f"""

Where the `dvc repro` overhead goes (medians): DVC's own work (hashing, dvc.lock, cache)
is the repro wall minus the sum of its stage processes,
{over["dvc_own_s"]["median"]:.1f} s. The five stage processes together take
{over["dvc_stage_processes_s"]["median"]:.1f} s more than the bare run: the first starts
Python and imports its libraries (`python -c "{STARTUP_IMPORTS}"` alone takes
{spread(startup, "{:.1f}")} s) while it starts the stage host, which loads the same in the
background; then each stage logs to MLflow and re-reads its inputs from disk, and register
also registers the model. With a process per stage, every stage pays the imports itself
(the table below). The Prefect overhead holds its temporary API server (started while
TensorFlow imports), task bookkeeping, MLflow logging and model registration, and keeping
the run's data in DVC (the flow's data is not in DVC's cache yet; under `dvc repro` it is);
the Prefect home's database is created before timing starts.
"""
    return text + imports_text(row) + data_rss_text(row)


def imports_text(row: dict[str, Any]) -> str:
    if "imports" not in row:
        return ""
    rows = [
        [
            stage,
            f"{found['import_s']:.1f}",
            "yes" if found["tensorflow"] else "no",
            "yes" if found["prefect"] else "no",
            ", ".join(found["heaviest"]),
        ]
        for stage, found in row["imports"].items()
    ]
    headers = ["stage process", "imports: s", "TensorFlow", "Prefect", "heaviest imports"]
    total = sum(found["import_s"] for found in row["imports"].values())
    bare = row["bare"]["wall_s"]["median"]
    register_dvc = row["dvc"]["stages"]["register"]["wall_s"]["median"]
    register_alone = row["dvc_per_process"]["stages"]["register"]["wall_s"]["median"]
    register_bare = row["bare"]["steps"]["register"]["wall_s"]["median"]
    return (
        "\nWhat each stage process imports with a process per stage (`PIPELINE_STAGE_HOST=0 "
        "dvc repro`, `python -X importtime`, one tiny run; the sum of its top-level imports, "
        "made wherever the stage makes them):\n\n"
        + table(headers, rows)
        + f"\n\nThe fixed cost of the per-process design: the "
        f"five stage processes spend {total:.1f} s importing alone, {100 * total / bare:.0f}% "
        "of the bare run's wall time, before any work. Only the stages that run Keras load "
        "TensorFlow and none loads Prefect, but each of them is its own Python process under "
        "DVC and needs MLflow (every stage logs to the pipeline's run), and train, evaluate "
        "and register need TensorFlow and DALI. The stage host pays them once per `dvc "
        f"repro`, in the background (register: {register_dvc:.1f} s in the host, "
        f"{register_alone:.1f} s as a process of its own, {register_bare:.1f} s bare).\n"
    )


def data_rss_text(row: dict[str, Any]) -> str:
    if "data_stage_rss" not in row:
        return ""
    found = row["data_stage_rss"]
    target = row["target_data_rss_mib"]
    rows = [[f"{r['images']:,}", f"{r['wall_s']:.1f}", f"{r['peak_rss_mib']:,.0f}"] for r in found]
    first, last = found[0], found[-1]
    slope = (last["peak_rss_mib"] - first["peak_rss_mib"]) / (last["images"] - first["images"])
    base = first["peak_rss_mib"] - slope * first["images"]
    largest = found[-1]
    met = largest["peak_rss_mib"] <= target
    return (
        "\nThe data stage alone (`python -m flows.stage data`, `data.source=synthetic`, 5/6 "
        "train and 1/6 test images of 32x32x3) at three sizes:\n\n"
        + table(["images", "wall s", "peak RSS MiB"], rows)
        + f"\n\nGrowth: {1000 * slope:.1f} MiB per 1,000 images over a {base:,.0f} MiB base "
        f"(a 32x32x3 uint8 image is 3 KiB); at {largest['images']:,} images "
        f"{largest['peak_rss_mib']:,.0f} MiB, target <= {target:,} MiB: {verdict(met)}.\n"
    )


def noop_section(result: dict[str, Any] | None, quick: bool) -> str:
    text = "## 4. `dvc repro` with nothing to do\n\n"
    if not result:
        return text + missing("stages", quick)
    row = result["rows"][0]
    met = row["seconds"]["median"] <= row["target_s"]
    rows = [
        [
            row["what"],
            spread(row["seconds"], "{:.2f}"),
            f"<= {row['target_s']:g} s: {verdict(met)}",
            load(row),
            code(row["command"]),
        ]
    ]
    return text + table(["what", "seconds", "target", "load", "command"], rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
