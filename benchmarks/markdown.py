"""Markdown pieces every benchmark's section of BENCHMARKS.md is written with."""

from __future__ import annotations

from typing import Any


def spread(summary: dict[str, Any], fmt: str = "{:,.0f}") -> str:
    """``median (min-max, n=k)``."""
    body = fmt.format(summary["median"])
    if summary["n"] == 1:
        return f"{body} (n=1)"
    return f"{body} ({fmt.format(summary['min'])}-{fmt.format(summary['max'])}, n={summary['n']})"


def load(row: dict[str, Any]) -> str:
    return "{before:.1f}/{after:.1f}".format(**row["load_avg_1min"])


def code(text: str) -> str:
    return f"`{text}`"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


def missing(module: str, quick: bool) -> str:
    flag = " --quick" if quick else ""
    return f"Not measured yet: run `python -m benchmarks.{module}{flag}`.\n"


def size(num_bytes: int) -> str:
    return f"{num_bytes / 1024:,.0f} KiB"


def ms(value: float) -> str:
    """Milliseconds with three significant-ish digits: 0.052, 4.79, 43.4."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def mean_sd(summary: dict[str, Any], scale: float = 100.0, unit: str = "%") -> str:
    """``mean ± sd (min-max, n=k)``, in percent (or points) by default."""
    return (
        f"{scale * summary['mean']:.2f}{unit} ± {scale * summary['sd']:.2f} "
        f"({scale * summary['min']:.2f}-{scale * summary['max']:.2f}, n={summary['n']})"
    )
