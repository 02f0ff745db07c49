"""What a reproduction compares, and when it counts as one: the pure part of flows.reproduce.

A registered version is identified by ``models:/<name>/<version>`` and described by the
tags the register stage sets (commit, data version, params, run id). The rebuilt model's
test metrics are compared with the original run's under one of three rules:

- exact: the original trained with TensorFlow op determinism on, with the TensorFlow and
  Keras versions installed now, and the reproduction ran with determinism on too (and with
  oneDNN's CPU kernels on or off as the original, where the version records it). Same
  code, data, params, seeds and libraries on a deterministic path give the same bits, so
  any difference means one of them was not what the tags say.
- tolerance (any other case, including a version that does not record these facts): every
  metric within an absolute tolerance, 1e-6 by default. One test image more or less right
  moves accuracy by 1/N and a class's F1 by about 1/support, both far above 1e-6 for any
  test set under a million images, so within 1e-6 means the same prediction for every
  test image; what it forgives is float32 rounding in the mean loss (~1e-7 relative)
  from a different summation order.
- cross-device: the original trained on a GPU and the reproduction on a CPU (or the other
  way round). Their kernels (cuDNN's convolutions, fused batch norm, the order of their
  reductions) round differently, so the weights drift apart from the first step and a few
  test predictions may change: every metric within 0.02 absolute by default
  (``--cross-device-tolerance``), and the report says it is this rule, never "exact".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.errors import ReproduceError
from tasks.tracking.runs import LEGACY_TEST_PREFIX, TEST_PREFIX

# Same name rule as params.yaml register.model_name; versions are positive integers.
MODEL_URI = re.compile(
    r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})/(?P<version>[1-9]\d{0,8})"
)
COMMIT = re.compile(r"(?P<sha>[0-9a-f]{40})(?P<dirty>-dirty)?")
DATA_VERSION = re.compile(r"[0-9a-f]{32}(\.dir)?")  # DVC md5, ".dir" for a directory
RUN_ID = re.compile(r"[0-9a-f]{32}")
# What tasks/stages/register.py log_and_register tags every version with.
REQUIRED_TAGS = ("git_commit", "data_version", "params", "run_id", "test_accuracy")
REPRODUCES_TAG = "reproduces"  # on the reproduction's MLflow run: <name>/<version>
DETERMINISTIC_TAG = "deterministic"  # "true" / "false": TF op determinism in that training
VERSIONS_TAG = "versions"  # JSON {package: version} (tasks/stages/register.py lineage_tags)
LIBRARY_TAGS = {"tensorflow": VERSIONS_TAG, "keras": VERSIONS_TAG}  # what exactness needs
DEFAULT_TOLERANCE = 1e-6  # absolute, per metric; see the module docstring
CROSS_DEVICE_TOLERANCE = 0.02  # absolute, per metric, between a GPU and a CPU training
ONEDNN_TAG = "onednn"  # "true" / "false": TensorFlow's oneDNN CPU kernels in that training
DEVICE_TAG = "device"  # the GPU's name, or "CPU: <model> (<n> cores)" (tasks/tracking/lineage.py)
HEADLINE_METRICS = ("test/accuracy", "test/loss", "test/macro_f1")  # tasks/stages/evaluate.py
CLASS_F1_PREFIX = "per_class/f1_"  # per-class F1, from reports/evaluate/per_class.json
LEGACY_CLASS_F1_PREFIX = "test_f1_"  # the same, as runs logged them before chart sections
MAX_QUOTED_CHARS = 200  # of a caller's text quoted back in an error


def parse_model_uri(uri: str) -> tuple[str, str]:
    """(name, version) of ``models:/<name>/<version>``; anything else is refused.

    The one gate for what a caller (a deployment parameter) sends: only a name of
    letters, digits, '.', '_', '-' and a number get past it.
    """
    match = MODEL_URI.fullmatch(uri) if isinstance(uri, str) else None
    if match is None:
        quoted = repr(uri)[:MAX_QUOTED_CHARS]
        raise ReproduceError(
            f"{quoted} is not a model version URI: expected models:/<name>/<version>, e.g. "
            "models:/cifar10-seed_cnn/3 (name: letters, digits, '.', '_', '-'; version: a number)"
        )
    return match["name"], match["version"]


def check_tolerance(tolerance: float) -> float:
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ReproduceError(f"tolerance {tolerance!r} must be a finite number >= 0")
    return float(tolerance)


@dataclass(frozen=True)
class VersionRecord:
    """What a registered version says made it, read from its registry tags."""

    name: str
    version: str
    commit: str  # 40 hex digits
    dirty: bool  # tracked files differed from ``commit`` when it was trained
    data_version: str  # DVC md5 of data/prepared
    params: dict[str, Any]  # flattened resolved config: dotted key -> value
    run_id: str
    deterministic: bool | None  # None: not recorded
    libraries: dict[str, str] = field(default_factory=dict)  # package -> version, as tagged
    device: str | None = None  # what trained it, as tagged; None: not recorded
    data_storage: str | None = None  # where register kept the data; None: before it did
    preprocess_version: str | None = None  # DVC md5 of data/preprocess; None: not recorded
    onednn: bool | None = None  # None: not recorded (registered before it was)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @classmethod
    def from_tags(cls, name: str, version: str, tags: Mapping[str, str]) -> VersionRecord:
        """Validate the tags; a version registered by something else is refused here."""
        uri = f"models:/{name}/{version}"
        missing = [tag for tag in REQUIRED_TAGS if tag not in tags]
        if missing:
            raise ReproduceError(
                f"{uri} has no {', '.join(missing)} tag(s), which this pipeline's register "
                "stage sets on every version: it was registered by something else, so there "
                "is no recorded commit, data version and params to rebuild it from"
            )
        commit = _tag(uri, tags, "git_commit", COMMIT, "a git commit (40 hex digits)")
        return cls(
            name=name,
            version=version,
            commit=commit["sha"],
            dirty=commit["dirty"] is not None,
            data_version=_tag(uri, tags, "data_version", DATA_VERSION, "a DVC md5")[0],
            params=_params(uri, tags["params"]),
            run_id=_tag(uri, tags, "run_id", RUN_ID, "an MLflow run id")[0],
            deterministic=_flag(tags, DETERMINISTIC_TAG),
            libraries=_libraries(tags),
            device=tags.get(DEVICE_TAG),
            data_storage=tags.get("data_storage"),
            preprocess_version=_optional(uri, tags, "preprocess_version", DATA_VERSION),
            onednn=_flag(tags, ONEDNN_TAG),
        )

    @property
    def on_gpu(self) -> bool | None:
        """Whether it trained on a GPU; None when its device was not tagged."""
        return None if self.device is None else not self.device.startswith("CPU")


def _libraries(tags: Mapping[str, str]) -> dict[str, str]:
    """The versions of the packages exactness depends on, as the register stage tagged them."""
    try:
        versions = json.loads(tags.get(VERSIONS_TAG, "{}"))
    except ValueError:
        return {}
    if not isinstance(versions, dict):
        return {}
    return {package: str(versions[package]) for package in LIBRARY_TAGS if package in versions}


def _tag(uri: str, tags: Mapping[str, str], key: str, pattern: re.Pattern, what: str) -> re.Match:
    match = pattern.fullmatch(tags[key])
    if match is None:
        raise ReproduceError(
            f"{uri}: its {key} tag {tags[key][:MAX_QUOTED_CHARS]!r} is not {what}, so it "
            "cannot be rebuilt (was it registered outside a git checkout of this project?)"
        )
    return match


def _optional(uri: str, tags: Mapping[str, str], key: str, pattern: re.Pattern) -> str | None:
    return _tag(uri, tags, key, pattern, "a DVC md5")[0] if key in tags else None


def _params(uri: str, text: str) -> dict[str, Any]:
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, dict) or not all(isinstance(key, str) for key in params):
        raise ReproduceError(f"{uri}: its params tag is not a JSON object of dotted keys")
    return params


@dataclass(frozen=True)
class Rebuilt:
    """How the reproduction ran, as its own process reported it."""

    op_determinism: bool
    libraries: dict[str, str]  # package -> version
    device: str | None = None  # "GPU: <names>" or "CPU: ..."; None: not reported
    preprocess_version: str | None = None  # DVC md5 of the rebuilt data/preprocess
    onednn: bool | None = None  # None: not reported

    @property
    def on_gpu(self) -> bool | None:
        return None if self.device is None else not self.device.startswith("CPU")


@dataclass(frozen=True)
class Rule:
    exact: bool
    tolerance: float  # 0 for the exact rule
    reason: str
    cross_device: bool = False

    def accepts(self, difference: float | None) -> bool:
        return difference is not None and difference <= self.tolerance

    def describe(self) -> str:
        """What the rule is and why it applies, for the lines under the table."""
        if self.exact:
            return f"exact: every metric identical\n  because {self.reason}"
        if self.cross_device:
            return (
                f"cross-device tolerance {self.tolerance:g} (absolute, every metric; not an "
                f"exact reproduction)\n  because {self.reason}\n  GPU and CPU kernels round "
                "differently, so the weights drift apart from the first step and a few test "
                "predictions may differ"
            )
        return (
            f"tolerance {self.tolerance:g} (absolute, every metric)\n  because {self.reason}\n"
            "  one test image predicted differently moves accuracy by 1/N and a class F1 by "
            "~1/support, far above 1e-6: within it, every prediction is the same and only "
            "float32 rounding in the loss differs"
        )


def choose_rule(
    original: VersionRecord,
    rebuilt: Rebuilt,
    tolerance: float,
    cross_device_tolerance: float = CROSS_DEVICE_TOLERANCE,
) -> Rule:
    """Exact when everything bit-reproducibility needs is recorded and holds; cross-device
    when one side trained on a GPU and the other on a CPU; else tolerance."""
    if None not in (original.on_gpu, rebuilt.on_gpu) and original.on_gpu != rebuilt.on_gpu:
        reason = f"it trained on {original.device}, the reproduction on {rebuilt.device}"
        return Rule(False, cross_device_tolerance, reason, cross_device=True)
    doubts = []
    if original.deterministic is None:
        doubts.append(f"the original's op determinism is unknown (no {DETERMINISTIC_TAG!r} tag)")
    elif not original.deterministic:
        doubts.append("the original trained without op determinism")
    if not rebuilt.op_determinism:
        doubts.append("this reproduction ran without op determinism (train.xla on)")
    if None not in (original.onednn, rebuilt.onednn) and original.onednn != rebuilt.onednn:
        said = {True: "on", False: "off"}
        doubts.append(
            f"oneDNN's CPU kernels were {said[original.onednn]}, now {said[rebuilt.onednn]}"
        )
    for package, tag in LIBRARY_TAGS.items():
        then, now = original.libraries.get(package), rebuilt.libraries.get(package)
        if then is None:
            doubts.append(f"the original's {package} version is unknown (no {tag!r} tag)")
        elif then != now:
            doubts.append(f"{package} was {then}, now {now}")
    if doubts:
        return Rule(exact=False, tolerance=tolerance, reason="; ".join(doubts))
    versions = ", ".join(f"{pkg} {ver}" for pkg, ver in sorted(rebuilt.libraries.items()))
    reason = f"both ran with op determinism on and the same {versions}"
    return Rule(exact=True, tolerance=0.0, reason=reason)


def _flag(tags: Mapping[str, str], key: str) -> bool | None:
    """A "true"/"false" tag; None when absent (registered before it was recorded)."""
    return {"true": True, "false": False}.get(tags.get(key, ""))


def onednn_words(onednn: bool | None) -> str:
    return "" if onednn is None else f", oneDNN {'on' if onednn else 'off'}"


@dataclass(frozen=True)
class Row:
    metric: str
    original: float | None
    reproduced: float | None

    @property
    def difference(self) -> float | None:
        if self.original is None or self.reproduced is None:
            return None
        return abs(self.reproduced - self.original)


def current_name(key: str) -> str:
    """A metric's name as runs log it now; a version registered before the MLflow chart
    sections (``test_accuracy``, ``test_f1_<class>``) is compared under the same names."""
    if key.startswith(LEGACY_CLASS_F1_PREFIX):
        return CLASS_F1_PREFIX + key.removeprefix(LEGACY_CLASS_F1_PREFIX)
    if (
        key.startswith(LEGACY_TEST_PREFIX)
        and TEST_PREFIX + key.removeprefix(LEGACY_TEST_PREFIX) in HEADLINE_METRICS
    ):
        return TEST_PREFIX + key.removeprefix(LEGACY_TEST_PREFIX)
    return key


def class_f1_metrics(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-class F1 (per_class.json) under the names compared, ``per_class/f1_<class>``
    (the name as runs once logged it as ``test_f1_<class>``)."""
    safe = {
        name: "".join(c if c.isalnum() or c in "_-." else "_" for c in name) for name in per_class
    }
    return {CLASS_F1_PREFIX + safe[name]: float(scores["f1"]) for name, scores in per_class.items()}


def compared_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a reproduction is judged on: accuracy, loss, macro F1, per-class F1."""
    flat = {current_name(key): value for key, value in metrics.items()}
    keys = [key for key in HEADLINE_METRICS if key in flat]
    keys += [key for key in flat if key.startswith(CLASS_F1_PREFIX)]
    return {key: float(flat[key]) for key in keys}


def compare(original: Mapping[str, float], reproduced: Mapping[str, float]) -> list[Row]:
    """One row per metric either side has, in the reproduction's order (classes as named)."""
    ours, theirs = compared_metrics(reproduced), compared_metrics(original)
    keys = list(ours) + [key for key in theirs if key not in ours]
    return [Row(key, theirs.get(key), ours.get(key)) for key in keys]


def matches(rows: list[Row], rule: Rule) -> bool:
    return bool(rows) and all(rule.accepts(row.difference) for row in rows)


def format_table(rows: list[Row]) -> str:
    """Side by side, full precision (repr), so an exact match can be seen to be exact."""

    def cell(value: float | None) -> str:
        return "missing" if value is None else repr(value)

    lines = [("metric", "original", "reproduction", "|difference|")]
    for row in rows:
        difference = "-" if row.difference is None else f"{row.difference:.3g}"
        lines.append((row.metric, cell(row.original), cell(row.reproduced), difference))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def verdict(rows: list[Row], rule: Rule) -> str:
    """The closing line: MATCH or DIFFERENT, with the largest difference against the rule."""
    known = [row.difference for row in rows if row.difference is not None]
    largest = f"largest difference {max(known):.3g}" if known else "nothing to compare"
    missing = [row.metric for row in rows if row.difference is None]
    if missing:
        largest += f"; missing on one side: {', '.join(missing)}"
    if matches(rows, rule):
        kind = "MATCH within the cross-device tolerance" if rule.cross_device else "MATCH"
        return f"{kind} ({largest}, allowed {rule.tolerance:g})"
    return f"DIFFERENT ({largest}, allowed {rule.tolerance:g})"


@dataclass(frozen=True)
class Outcome:
    """A finished reproduction: what was rebuilt, how, and how it compares."""

    record: VersionRecord
    rebuilt: Rebuilt
    run_id: str | None  # the reproduction's MLflow run
    rule: Rule
    rows: list[Row]

    @property
    def matched(self) -> bool:
        return matches(self.rows, self.rule)

    def report(self) -> str:
        """The side-by-side table, the rule applied and why, and the verdict."""
        original = self.record
        rebuilt = self.rebuilt
        then = {True: "on", False: "off", None: "unknown (not tagged)"}[original.deterministic]
        now = "on" if rebuilt.op_determinism else "off"
        return "\n".join(
            [
                f"original:     MLflow run {original.run_id}, op determinism {then}, "
                + describe_libraries(original.libraries)
                + f", {original.device or 'device unknown (not tagged)'}"
                + onednn_words(original.onednn),
                f"reproduction: MLflow run {self.run_id} "
                f"({REPRODUCES_TAG}={original.name}/{original.version}), op determinism {now}, "
                + describe_libraries(rebuilt.libraries)
                + f", {rebuilt.device or 'device unknown'}"
                + onednn_words(rebuilt.onednn),
                self.preprocess_line(),
                "",
                format_table(self.rows),
                "",
                f"rule: {self.rule.describe()}",
                f"result: {verdict(self.rows, self.rule)}",
            ]
        )

    def preprocess_line(self) -> str:
        """Whether preprocess rebuilt the same outputs (norm stats, unigram) as the original."""
        then, now = self.record.preprocess_version, self.rebuilt.preprocess_version
        if then is None or now is None:
            return "preprocess outputs: not compared (the version does not record their hash)"
        if then == now:
            return f"preprocess outputs: identical (data/preprocess {now})"
        return f"preprocess outputs: differ (data/preprocess was {then}, rebuilt {now})"

    @property
    def rule_name(self) -> str:
        if self.rule.exact:
            return "exact"
        kind = "cross-device tolerance" if self.rule.cross_device else "tolerance"
        return f"{kind} {self.rule.tolerance:g}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_uri": self.record.uri,
            "matched": self.matched,
            "rule": self.rule_name,
            "reason": self.rule.reason,
            "reproduction_run_id": self.run_id,
            "rows": [asdict(row) | {"difference": row.difference} for row in self.rows],
        }


def describe_libraries(versions: Mapping[str, str]) -> str:
    return ", ".join(
        f"{name} {versions.get(name, 'unknown (not tagged)')}" for name in LIBRARY_TAGS
    )
