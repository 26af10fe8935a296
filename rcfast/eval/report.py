"""Result tables and charts: a plain-text table, ``report.md`` and a bar chart PNG.

Rows are models, columns are metrics; a missing value prints as ``-``. The chart
is drawn with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["format_table", "markdown_table", "bar_chart"]


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def format_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str], row_header: str = "model") -> str:
    """Aligned plain-text table of ``rows[name][column]``."""
    header = [row_header, *columns]
    body = [[name, *(_cell(values.get(c)) for c in columns)] for name, values in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def markdown_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str], row_header: str = "model") -> str:
    """The same table in GitHub markdown."""
    out = [f"| {row_header} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in rows.items():
        out.append(f"| {name} | " + " | ".join(_cell(values.get(c)) for c in columns) + " |")
    return "\n".join(out)


def bar_chart(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], path: str | Path,
              title: str, ylabel: str = "accuracy", errors: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Grouped bars: one group per column, one bar per row; saved as PNG at ``path``.

    ``errors[row][column]``, when given, draws an error bar of that half-height (e.g. a std).
    """
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(rows)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 0.25 * len(names) * len(columns)) + 3.0, 4.2))
    for i, name in enumerate(names):
        values = [rows[name].get(c) for c in columns]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(columns))]
        yerr = None
        if errors is not None:
            yerr = [errors.get(name, {}).get(c) or 0.0 for c in columns]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name, yerr=yerr,
               error_kw={"elinewidth": 0.8, "capsize": 1.5})
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
