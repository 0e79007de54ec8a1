"""How a result shows itself in a notebook cell: a table and a ``[layer, head]`` map in inline HTML.

No matplotlib and nothing from the app layer: core draws nothing, and a cell must render whatever
plotting backend (or none) the notebook has. The result classes hand over plain frames and arrays.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from chg_tlens.core.convergence import UNCLASSIFIED

ROLE_COLOURS = {"facilitating": "#4c9f70", "interfering": "#d1495b", "irrelevant": "#d9d9d9",
                UNCLASSIFIED: "#ffffff", "mixed": "#f2d492"}
ROLE_CODES = {"facilitating": "F", "interfering": "X", "irrelevant": "-", UNCLASSIFIED: "?", "mixed": "~"}
GATE_COLOURS = {"closed in every seed": "#d1495b", "closed in some seeds": "#f2d492",
                "open in every seed": "#4c9f70"}


def role_map_html(summary: pd.DataFrame, consensus: np.ndarray, n_seeds: int, threshold: float) -> str:
    """A CHGResult: its role shares per seed and the ``[layer, head]`` role every seed agrees on."""
    n_layers, n_heads = consensus.shape
    caption = (f"CHGResult: {n_seeds} seed(s), {n_layers} layers x {n_heads} heads, "
               f"threshold {threshold}. Map: each head's role in every seed (mixed: seeds disagree).")
    table = summary.to_html(float_format=lambda x: f"{x:.1%}")
    codes = np.vectorize(ROLE_CODES.get)(consensus)
    return _map_html(caption, table, consensus, codes, ROLE_COLOURS)


def closed_map_html(closed: np.ndarray, mean_gates: np.ndarray, table: pd.DataFrame | None) -> str:
    """A ContrastiveResult: its before/after ``table`` (if any) and which heads close in how many seeds
    (``closed`` is ``[seed, layer, head]``), each cell showing the mean gate."""
    every, some = closed.all(axis=0), closed.any(axis=0)
    labels = np.where(every, "closed in every seed", np.where(some, "closed in some seeds",
                                                              "open in every seed")).astype(object)
    n_seeds, n_layers, n_heads = closed.shape
    caption = (f"ContrastiveResult: {n_seeds} seed(s), {n_layers} layers x {n_heads} heads; "
               f"{int(every.sum())} head(s) closed in every seed, {int(some.sum())} in at least one. "
               "Map: mean gate over seeds.")
    table_html = "" if table is None else table.to_html(index=False, float_format=lambda x: f"{x:.3g}")
    texts = np.vectorize(lambda g: f"{g:.2f}")(mean_gates)
    return _map_html(caption, table_html, labels, texts, GATE_COLOURS)


def _map_html(caption: str, table: str, labels: np.ndarray, texts: np.ndarray,
              colours: dict[str, str]) -> str:
    """Caption, a table, and a ``[layer, head]`` map coloured by label."""
    cell = "border:1px solid #999;min-width:1.6em;text-align:center;padding:1px 3px;font-size:85%"
    rows = []
    for layer in range(labels.shape[0]):
        cells = "".join(
            f'<td data-head="{layer}.{head}" title="layer {layer} head {head}: {html.escape(label)}"'
            f' style="{cell};background:{colours[label]}">{html.escape(str(text))}</td>'
            for head, (label, text) in enumerate(zip(labels[layer], texts[layer], strict=True)))
        rows.append(f"<tr><th>{layer}</th>{cells}</tr>")
    header = "".join(f"<th>{head}</th>" for head in range(labels.shape[1]))
    legend = " ".join(f'<span style="background:{colour};border:1px solid #999;padding:0 4px">'
                      f"{html.escape(name)}</span>" for name, colour in colours.items())
    return (f"<div><p><b>{html.escape(caption)}</b></p>{table}"
            f'<table style="border-collapse:collapse;margin-top:6px"><tr><th>layer \\ head</th>{header}</tr>'
            f'{"".join(rows)}</table><p>{legend}</p></div>')
