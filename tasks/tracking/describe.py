"""The registry's descriptions, in the words a person browsing the MLflow UI reads.

The registered model's description says what the name serves and how to load it; each
version's says how good it is, on which data, and why it is or is not the champion; the
export stage adds what was exported. Machines read the tags (lineage, binding); these
are for people, so they are Markdown (the MLflow UI renders them).
"""

from __future__ import annotations

from typing import Any

EXPORTS_HEADING = "**Exports**"  # the export stage's part of a version description


def model_description(name: str, what: str, interface: str, classes: str) -> str:
    """``what``: the model family and data; ``interface``: the modality's input and output."""
    return "\n\n".join(
        [
            f"{what}, registered by the training pipeline's register stage.",
            interface,
            f"Classes: {classes}.",
            "Aliases: `champion` is the version with the best test accuracy so far (it moves "
            "only when a newer one beats it by `register.promote_margin` on the same test "
            "data); `challenger` is the newest version.",
            "Load it with nothing from the pipeline's repository: "
            f'`mlflow.pyfunc.load_model("models:/{name}@champion").predict(batch)`, or '
            f"serve it: `mlflow models serve -m models:/{name}@champion` "
            "(`make serve-model` adds the credential).",
        ]
    )


def promotion_reason(
    version: str, test_accuracy: float, aliases: dict[str, Any], margin: float
) -> str:
    """Why the champion did or did not move to ``version`` (``aliases``: move_aliases')."""
    previous = aliases["previous_champion"]
    if previous.get("version") is None:
        return "Promoted to **champion**: there was no champion yet."
    if previous["version"] == version:
        return "Already the **champion** (a rerun of the stage that registered it)."
    champion = previous["compared_accuracy"]
    where = "re-evaluated on this version's test data" if previous.get("reevaluated") else ""
    versus = f"version {previous['version']} ({champion:.4f}{', ' + where if where else ''})"
    gain = test_accuracy - champion
    if aliases["promoted"]:
        return f"Promoted to **champion** over {versus}: better by {gain:.4f} (margin {margin:g})."
    return (
        f"Not promoted: the champion, {versus}, is not beaten by at least {margin:g} "
        f"(this version: {gain:+.4f}; `register.promote_margin`; a tie never moves it)."
    )


def version_description(
    uri: str,
    test_accuracy: float,
    aliases: dict[str, Any],
    lineage: dict[str, str],
    margin: float,
) -> str:
    """``uri``: models:/<name>/<version>; ``lineage``: the version's lineage tags."""
    data, commit = lineage["data_version"], lineage["git_commit"]
    version = uri.rsplit("/", 1)[1]
    return "\n\n".join(
        [
            f"Test accuracy **{test_accuracy:.4f}** on data version `{data[:12]}` "
            f"(DVC hash of data/prepared).",
            promotion_reason(version, test_accuracy, aliases, margin),
            f"Trained at commit `{commit[:12]}` on {lineage['device']}, seed "
            f"{lineage['seed']}, by MLflow run `{lineage['run_id']}`; rebuild it with "
            f"`python -m flows.reproduce {uri}`.",
        ]
    )


def with_exports(description: str | None, rows: list[str]) -> str:
    """``description`` with its exports section replaced by ``rows`` (an export rerun for
    the same version rewrites the section instead of appending a second one)."""
    kept = (description or "").split(EXPORTS_HEADING)[0].rstrip()
    section = "\n".join([EXPORTS_HEADING, "", *(f"- {row}" for row in rows)])
    return f"{kept}\n\n{section}" if kept else section
