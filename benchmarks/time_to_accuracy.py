"""Time to accuracy on Fashion-MNIST (Debian's IDX files), fast profile vs the seed CNN.

For each model, these runs, one after the other:

1. the curve: `tasks.stages.train.train_model` with the model's config, plus a callback that
   scores the test set after every epoch with the evaluate stage's own code
   (`predict_logits`, flip TTA when the config has it; the averaged weights when it uses
   weight averaging, as the final model does). The clock is train_model's wall time
   (build, input pipeline, fit with per-epoch validation) minus the callback's own time.
2. the real pipeline, `python -m flows.pipeline ... --workdir <tmp>`, once per seed
   (train.seed; the first is the curve run's), for the test accuracy of the model it
   registers (reports/metrics.json) and its wall time: the goal is judged on these.

    python -m benchmarks.time_to_accuracy [--model fast] [--seeds 42,1,2] [--quick]

Quick mode swaps the data for a tiny synthetic 28x28x1 set and 2 epochs: it checks the
code, its accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
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
    cpu_cell,
    load_average,
    log,
    python_module,
    report_path,
    results_dir,
    run_measured,
    stamp_row,
    summarize,
    warm_prefect,
    write_rows,
)
from benchmarks.markdown import code, load, missing, spread, table, verdict
from tasks import startup

MODELS: dict[str, dict[str, Any]] = {
    "fast": {"profile": "profiles/fast_fashion_mnist.yaml", "overrides": {}, "seeds": (42, 1, 2)},
    "seed": {
        "profile": None,
        "overrides": {"data.source": "idx", "data.name": "fashion_mnist"},
        "seeds": (42,),
    },
}
# The fast profile's goal, per seed: the whole pipeline, as the README runs the profile.
TARGET = {"test_accuracy": 0.94, "wall_s": 600.0}
QUICK_OVERRIDES = {
    "data.source": "synthetic",
    "data.synthetic.image_size": 28,
    "data.synthetic.channels": 1,
    "data.synthetic.train_size": 1_500,
    "data.synthetic.test_size": 500,
    "train.epochs": 2,
    "preprocess.grid_samples": 16,
}


def overrides_for(model: str, quick: bool) -> dict[str, Any]:
    return MODELS[model]["overrides"] | (QUICK_OVERRIDES if quick else {})


def model_config(model: str, quick: bool) -> Any:
    from tasks.config import load_config, load_profile

    profile = MODELS[model]["profile"]
    merged = load_profile(REPO / profile) if profile else {}
    return load_config(PARAMS, merged | overrides_for(model, quick))


# ------------------------------------------------------------------------------- curve


def test_accuracy(model: Any, cfg: Any, test: tuple, stats: Any, averaged: bool) -> float:
    """Test accuracy through the evaluate stage's code; ``averaged``: score the optimizer's
    weight average (what training ends with) and put the live weights back afterwards."""
    from tasks.images import evaluate

    live = [variable.numpy() for variable in model.trainable_weights] if averaged else []
    if averaged:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    try:
        logits = evaluate.predict_logits(model, *test, stats, cfg)
    finally:
        for variable, value in zip(model.trainable_weights, live, strict=False):
            variable.assign(value)
    names = [str(k) for k in range(logits.shape[1])]
    return evaluate.compute_metrics(logits, test[1], names)["test"]["accuracy"]


def accuracy_curve(cfg: Any, test: tuple, stats: Any) -> Any:
    """Keras callback: test accuracy after each epoch vs training seconds (its own excluded)."""
    import keras

    class AccuracyCurve(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.start = time.perf_counter()
            self.excluded_s = 0.0
            self.points: list[dict[str, Any]] = []

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            begin = time.perf_counter()
            accuracy = test_accuracy(self.model, cfg, test, stats, cfg.train.weight_averaging)
            self.points.append(
                {
                    "epoch": epoch + 1,
                    "train_s": begin - self.start - self.excluded_s,
                    "test_accuracy": accuracy,
                    "val_accuracy": float((logs or {}).get("val_accuracy", float("nan"))),
                }
            )
            self.excluded_s += time.perf_counter() - begin

    return AccuracyCurve()


def curve_worker(model: str, quick: bool, out: Path) -> None:
    from tasks.images import augment, data
    from tasks.stages import train

    cfg = model_config(model, quick)
    dataset = data.prepare_dataset(cfg.data, REPO)
    stats = augment.channel_stats(dataset.train_images)
    test = dataset.split("test")
    curve = accuracy_curve(cfg, test, stats)
    curve.start = time.perf_counter()
    trained, _ = train.train_model(
        cfg, dataset.split("train"), dataset.split("val"), dataset.num_classes, stats, [curve]
    )
    train_model_s = time.perf_counter() - curve.start - curve.excluded_s
    result = {
        "points": curve.points,
        "train_model_s": train_model_s,
        "final_test_accuracy": test_accuracy(trained, cfg, test, stats, averaged=False),
        "counts": dataset.counts,
    }
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------- pipeline


def pipeline_args(model: str, quick: bool, seed: int | None = None) -> list[str]:
    """`python -m flows.pipeline` arguments for ``model``, except --workdir; ``seed``:
    train.seed when it is not the profile's."""
    profile = MODELS[model]["profile"]
    args = ["--profile", profile] if profile else []
    overrides = overrides_for(model, quick)
    if seed is not None and seed != model_config(model, quick).train.seed:
        overrides = overrides | {"train.seed": seed}
    return [*args, *as_cli_overrides(overrides)]


def run_pipeline(model: str, quick: bool, scratch: Path, seed: int) -> dict[str, Any]:
    workdir = scratch / f"pipeline-{model}-{seed}"
    args = pipeline_args(model, quick, seed)
    measured = run_measured(
        python_module("flows.pipeline", *args, "--workdir", str(workdir)),
        cwd=REPO,
        env=child_env(scratch),
        log=scratch / f"pipeline-{model}-{seed}.log",
    )
    reports = workdir / "reports"
    registration = json.loads((reports / "registration.json").read_text())
    with (reports / "history.csv").open() as history:
        val_accuracy = [float(row["val_accuracy"]) for row in csv.DictReader(history)]
    return {
        "seed": seed,
        "wall_s": measured.wall_s,
        "peak_rss_mib": measured.peak_rss_mib,
        "test_accuracy": json.loads((reports / "metrics.json").read_text())["test"]["accuracy"],
        "registered": f"{registration['model_name']} version {registration['version']}",
        "val_accuracy": val_accuracy,
        "command": shlex.join(["python", "-m", "flows.pipeline", *args])
        + ' --workdir "$(mktemp -d)"',
    }


def first_reaching(points: list[dict[str, Any]], accuracy: float) -> dict[str, Any] | None:
    return next((p for p in points if p["test_accuracy"] >= accuracy), None)


def measure(model: str, seeds: tuple[int, ...], quick: bool, scratch: Path) -> dict[str, Any]:
    """The curve run (the profile's seed) and a pipeline run per seed, the profile's first."""
    load_before = load_average()
    out = scratch / f"curve-{model}.json"
    args = ["--worker", model, "--out", str(out), *(["--quick"] if quick else [])]
    measured = run_measured(
        python_module("benchmarks.time_to_accuracy", *args),
        cwd=REPO,
        env=child_env(scratch),
        log=scratch / f"curve-{model}.log",
    )
    curve = json.loads(out.read_text()) | {"peak_rss_mib": measured.peak_rss_mib}
    log(f"accuracy curve {model}: final {curve['final_test_accuracy']:.4f}")
    cfg = model_config(model, quick)
    seeds = (cfg.train.seed, *(seed for seed in seeds if seed != cfg.train.seed))
    default = MODELS[model]["seeds"]
    seed_args = [] if seeds == default else ["--seeds", ",".join(map(str, seeds))]
    pipelines = []
    for seed in seeds:
        pipelines.append(run_pipeline(model, quick, scratch, seed))
        log(f"pipeline {model} seed {seed}: test accuracy {pipelines[-1]['test_accuracy']:.4f}")
    profile = MODELS[model]["profile"]
    row = {
        "key": model,
        "model": cfg.model.name,
        "profile": profile,
        "profile_settings": profile_settings(profile),
        "overrides": overrides_for(model, quick),
        "data": {"source": cfg.data.source, "name": cfg.data.name, "idx_dir": cfg.data.idx_dir},
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "runs": len(pipelines),
        "curve": curve,
        "first_reaching_target": first_reaching(curve["points"], TARGET["test_accuracy"]),
        "pipeline": pipelines[0],
        "pipelines": pipelines,
        "target": TARGET if model == "fast" else None,
        "command": command(
            "benchmarks.time_to_accuracy", "--model", model, *seed_args, quick=quick
        ),
    }
    return stamp_row(row, load_before)


def seeds_for(model: str, option: str | None) -> tuple[int, ...]:
    if not option:
        return MODELS[model]["seeds"]
    try:
        return tuple(int(seed) for seed in option.split(","))
    except ValueError:
        raise SystemExit(f"--seeds {option!r}: expected integers separated by commas") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy")
    parser.add_argument("--model", action="append", choices=tuple(MODELS))
    parser.add_argument(
        "--seeds",
        help="comma-separated train.seed values, one pipeline run each (default: per model)",
    )
    parser.add_argument("--quick", action="store_true", help="synthetic stand-in, results/quick/")
    parser.add_argument("--worker", choices=tuple(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    startup.prepare_process()  # the pipeline's defaults (oneDNN on), for children too
    if args.worker:
        curve_worker(args.worker, args.quick, args.out)
        return 0
    plan = {model: seeds_for(model, args.seeds) for model in args.model or MODELS}
    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        warm_prefect(Path(tmp))
        rows = [measure(model, seeds, args.quick, Path(tmp)) for model, seeds in plan.items()]
    write_rows("time_to_accuracy", args.quick, rows, target=TARGET)
    return 0


def plot_curves(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for row in result["rows"]:
        points = row["curve"]["points"]
        ax.plot(
            [p["train_s"] for p in points],
            [100 * p["test_accuracy"] for p in points],
            marker="o",
            label=f"{row['key']} ({row['model']}, batch {row['batch_size']})",
        )
    target = result.get("target") or {}
    if target:
        ax.axhline(100 * target["test_accuracy"], color="grey", linestyle="--", linewidth=0.8)
    cpus = result["machine"]["logical_cpus"]
    ax.set_xlabel(f"cumulative training seconds (train_model, {cpus} CPU cores)")
    ax.set_ylabel("test accuracy, %")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)


def profile_settings(profile: str | None) -> dict[str, Any] | None:
    from tasks.config import load_profile

    return load_profile(REPO / profile) if profile else None


def profile_changes(rows: list[dict[str, Any]]) -> str:
    """A line per row whose profile file changed since it was measured: its numbers, and its
    commands' output today, belong to different settings until the benchmark runs again."""
    text = ""
    for row in rows:
        then = row.get("profile_settings")  # None: no profile
        if then is None:
            continue
        now = profile_settings(row["profile"])
        changed = [
            f"{code(key)} {then.get(key, 'unset')} -> {now.get(key, 'unset')}"
            for key in sorted(then.keys() | now.keys())
            if then.get(key) != now.get(key)
        ]
        if changed:
            text += (
                f"\n**{row['key']}: measured with {row['profile']} as it was then**; it has"
                f" changed since ({', '.join(changed)}), so its rows in this section are not"
                f" what their commands give today: {code(row['command'])} measures the"
                " current one.\n"
            )
    return text


def accuracy_section(result: dict[str, Any] | None, quick: bool, out_dir: Path) -> str:
    text = """## 5. Time to accuracy on Fashion-MNIST

Data per model below; a full run uses Debian's `dataset-fashion-mnist` IDX files
(`data.source=idx`). Per model, one curve run and one pipeline run per seed. The curve run is
`tasks.stages.train.train_model` with the model's config plus a callback that scores the test set
after each epoch with the evaluate stage's code (flip TTA and averaged weights when the
config uses them); its clock is train_model's wall time (model build, input pipeline, fit
with per-epoch validation) minus the callback's own time; it uses the profile's seed. The
pipeline run is the real Prefect flow, as the README runs the profile, with `train.seed`
set per seed; its test accuracy is the registered model's (reports/metrics.json) and its
wall time is the whole flow's (data to export). The fast profile's goal is judged on the
pipeline runs: every seed at least the target accuracy within the target wall time. The
recipe was chosen on validation accuracy (the data stage's 6,000-image split), not test.

"""
    if not result:
        return text + missing("time_to_accuracy", quick)
    target = result.get("target") or {}
    for row in result["rows"]:
        counts = ", ".join(f"{n:,} {split}" for split, n in row["curve"]["counts"].items())
        data = row["data"]
        where = f" from {data['idx_dir']}" if data["source"] == "idx" else ""
        text += f"- {row['key']}: data.source={data['source']} ({data['name']}{where}): {counts}\n"
    text += "\n"
    rows = []
    for row in result["rows"]:
        curve, first = row["curve"], row["first_reaching_target"]
        pipelines = row.get("pipelines") or [row["pipeline"]]
        reached = f"epoch {first['epoch']}, {first['train_s']:.0f} s" if first else "never"
        goal = "-"
        if row["target"]:
            met = all(
                p["test_accuracy"] >= target["test_accuracy"] and p["wall_s"] <= target["wall_s"]
                for p in pipelines
            )
            goal = f">= {100 * target['test_accuracy']:.1f}% in <= {target['wall_s']:.0f} s "
            goal += f"pipeline wall, every seed: {verdict(met)}"
        rows.append(
            [
                f"{row['key']}: {code(row['model'])}",
                f"{row['epochs']} x batch {row['batch_size']}",
                f"{100 * curve['final_test_accuracy']:.2f}%",
                f"{curve['train_model_s']:.0f}",
                reached,
                spread(summarize([100 * p["test_accuracy"] for p in pipelines]), "{:.2f}%"),
                spread(summarize([p["wall_s"] for p in pipelines])),
                goal,
                cpu_cell(row),
                code(row["command"]),
            ]
        )
    headers = [
        "model",
        "epochs",
        "test acc. (curve run)",
        "train s",
        f"first >= {100 * target.get('test_accuracy', 0.94):.0f}%",
        "pipeline test acc. (median, min-max over seeds)",
        "pipeline wall s",
        "target",
        "CPU",
        "command",
    ]
    text += table(headers, rows) + "\n" + profile_changes(result["rows"])
    text += "\nPipeline runs, one per seed:\n\n"
    seed_rows = [
        [
            row["key"],
            str(p.get("seed", "-")),
            f"{100 * p['test_accuracy']:.2f}%",
            f"{100 * p['val_accuracy'][-1]:.2f}%",
            f"{p['wall_s']:.0f}",
            p["registered"],
            code(p["command"]),
        ]
        for row in result["rows"]
        for p in row.get("pipelines") or [row["pipeline"]]
    ]
    headers = ["model", "seed", "test acc.", "last val acc.", "wall s", "registered", "command"]
    text += table(headers, seed_rows) + "\n"
    for row in result["rows"]:
        curve_val = [p["val_accuracy"] for p in row["curve"]["points"]]
        same = curve_val == row["pipeline"]["val_accuracy"]
        text += (
            f"\n{row['key']}: the pipeline's per-epoch validation accuracy "
            + ("is identical to" if same else "**differs** from")
            + " the curve run's (same seed, deterministic ops)."
        )
    text += "\n"
    plot = out_dir / "time_to_accuracy.png"
    plot_curves(result, plot)
    link = os.path.relpath(plot, report_path(out_dir == results_dir(True)).parent)
    text += f"\n![test accuracy vs training seconds]({link})\n"
    for row in result["rows"]:
        points = [
            [
                str(p["epoch"]),
                f"{p['train_s']:.0f}",
                f"{100 * p['test_accuracy']:.2f}",
                f"{100 * p['val_accuracy']:.2f}",
            ]
            for p in row["curve"]["points"]
        ]
        text += f"\n{row['key']} ({code(row['model'])}), load {load(row)}:\n\n"
        text += table(["epoch", "train s", "test acc. %", "val acc. %"], points) + "\n"
    return text


if __name__ == "__main__":
    sys.exit(main())
