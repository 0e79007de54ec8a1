"""Markdown tables, written once: benchmark tables, comparison tables, and the CLI's summaries."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

Cell = Callable[[Any], str]


def number_cell(value: Any) -> str:
    """Floats to three decimals (one past 10), everything else as its string."""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, cell: Cell = number_cell, na: str = "-") -> str:
    """A GitHub Markdown table of ``frame``'s columns and rows; missing values read ``na``."""
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(na if _missing(v) else cell(v) for v in row) + " |")
    return "\n".join(lines)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _metric_cell(metric: str) -> Cell:
    """Counts with thousands separators, seconds to 0.1, every other metric to 0.001."""
    spec = ",.0f" if metric.endswith("passes") else ".1f" if metric == "seconds" else ".3f"
    return lambda v: format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


COMPARISON_TABLES = (
    ("auc", "ROC AUC (facilitating heads)"),
    ("precision_at_k", "Precision at k"),
    ("faithfulness_at_k", "Faithfulness at k"),
    ("spearman_vs_chg", "Spearman correlation with CHG (max over seeds)"),
    ("chg_role_accuracy", "CHG's own role labels: share of heads labelled as the truth says "
     "(mean over seeds)"),
    ("chg_facilitating_found_every_seed", "CHG: share of truly facilitating heads labelled facilitating in "
     "every seed"),
    ("forward_passes", "Cost: example forward passes"),
    ("backward_passes", "Cost: example backward passes"),
    ("seconds", "Cost: seconds"),
)


def comparison_markdown(frame: pd.DataFrame, details: dict[str, Any]) -> str:
    """The :func:`compare_methods` table as Markdown: one method x benchmark table per metric."""
    lines = ["# Head-scoring methods on benchmarks with known roles", "",
             "Positives = heads whose true role is *facilitating*. AUC: chance 0.5, perfect 1. "
             "Faithfulness at k: mean target log-prob with only the method's top-k heads kept, "
             "scaled so 0 = no heads, 1 = all heads (above 1: the kept set beats the full model). "
             "k = number of true facilitating heads (10% of heads where no reference exists).", ""]
    for metric, title in COMPARISON_TABLES:
        if metric not in frame:
            continue
        table = frame.pivot_table(index="method", columns="benchmark", values=metric, aggfunc="first",
                                  sort=False, dropna=False)
        table = table.reindex(columns=list(details))
        if metric.startswith("chg_"):
            table = table.dropna(how="all")
        lines += [f"## {title}", "", markdown_table(table.reset_index(), _metric_cell(metric), na="n/a"), ""]
    lines += ["## Benchmarks", ""]
    for name, info in details.items():
        skipped = ", ".join(f"{m} ({why})" for m, why in info["skipped"].items()) or "none"
        lines.append(f"- **{name}** (k = {info['k']}): {info['note']}. Skipped: {skipped}. "
                     f"{info['seconds']} s.")
    return "\n".join(lines) + "\n"
