"""Rank statistics for head scores: do two methods agree, and does a method find the known heads?

    spearman, top_k_overlap        do two methods rank heads alike?
    roc_auc, precision_at_k        does a method find the heads known to matter?
    sweep_roc                      the same for a method that returns kept sets over a threshold sweep (ACDC)

Written out in numpy (average ranks for ties) and checked on hand-made examples in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool
from torch import Tensor

from chg_tlens.analysis.baselines import HeadScores
from chg_tlens.errors import InputError

ScoresLike = HeadScores | Tensor | np.ndarray


# ------------------------------------------------------------------------------ rank statistics
def average_ranks(values: ScoresLike) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties sharing the mean of the ranks they span."""
    flat = flat_scores(values)
    order = np.argsort(flat, kind="stable")
    sorted_values = flat[order]
    ranks = np.empty(len(flat))
    start = 0
    while start < len(flat):
        stop = start
        while stop + 1 < len(flat) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(a: ScoresLike, b: ScoresLike) -> float:
    """Spearman rank correlation of two score tables (Pearson on average ranks); NaN if one is flat."""
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) != len(rb):
        raise InputError(f"spearman: the score tables hold {len(ra)} and {len(rb)} heads.")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def top_k_heads(scores: ScoresLike, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring ``(layer, head)``; ties go to the earlier head (row-major)."""
    shape = _shape(scores)
    flat = flat_scores(scores)
    _check_k(k, len(flat))
    order = np.argsort(-flat, kind="stable")[:k]
    return [(int(i) // shape[1], int(i) % shape[1]) for i in order]


def top_k_overlap(a: ScoresLike, b: ScoresLike, k: int) -> float:
    """Share of the top ``k`` heads two methods have in common (0 = none, 1 = the same set)."""
    return len(set(top_k_heads(a, k)) & set(top_k_heads(b, k))) / k


def roc_auc(scores: ScoresLike, positives: Bool[Tensor, "layer head"] | np.ndarray) -> float:
    """Probability that a random positive head outscores a random negative one (ties count half).

    The Mann-Whitney form: ``(sum of positive ranks - P(P+1)/2) / (P N)`` with average ranks.
    """
    flat = flat_scores(scores)
    labels = _labels(positives, len(flat), "roc_auc")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(
            f"roc_auc: needs at least one positive and one negative head, got {n_pos} and {n_neg}."
        )
    ranks = average_ranks(flat)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(
    scores: ScoresLike, positives: Bool[Tensor, "layer head"] | np.ndarray, k: int | None = None
) -> float:
    """Share of positives among the ``k`` top heads (``k`` = number of positives by default).

    Ties at the cut share the remaining places in proportion, so the value does not depend on
    which of several equal heads the sort happens to put first.
    """
    flat = flat_scores(scores)
    labels = _labels(positives, len(flat), "precision_at_k")
    if k is None:
        k = int(labels.sum())
    _check_k(k, len(flat))
    cut = np.sort(flat)[::-1][k - 1]
    above = flat > cut
    tied = flat == cut
    places_left = k - int(above.sum())
    hits = labels[above].sum() + places_left * labels[tied].mean()
    return float(hits / k)


def sweep_roc(
    kept_sets: Sequence[Bool[Tensor, "layer head"] | np.ndarray | list],
    positives: Bool[Tensor, "layer head"] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of a threshold sweep: one (FPR, TPR) point per kept set, plus (0, 0) and (1, 1); trapezoid AUC.

    How the ACDC paper scores its threshold sweeps; the points are sorted by FPR, ties by TPR.
    """
    if len(kept_sets) == 0:
        raise InputError("sweep_roc: needs at least one kept set.")
    n = int(np.asarray(positives).size)
    labels = _labels(positives, n, "sweep_roc")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(
            f"sweep_roc: needs at least one positive and one negative head, got {n_pos} and {n_neg}."
        )
    points = [(0.0, 0.0), (1.0, 1.0)]
    for kept in kept_sets:
        chosen = _labels(kept, n, "sweep_roc")
        points.append((float((chosen & ~labels).sum() / n_neg), float((chosen & labels).sum() / n_pos)))
    points.sort()
    fpr, tpr = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


# ------------------------------------------------------------------------------ against the truth
def truth_metrics(
    scores: ScoresLike, roles: np.ndarray, positive_role: str = "facilitating", k: int | None = None
) -> dict[str, float]:
    """ROC AUC and precision at ``k`` of ``scores`` for the heads whose true role is ``positive_role``."""
    roles = np.asarray(roles, dtype=object)
    positives = roles == positive_role
    return {
        "auc": roc_auc(scores, positives),
        "precision_at_k": precision_at_k(scores, positives, k),
        "n_positive": int(positives.sum()),
    }


def method_agreement(methods: Sequence[HeadScores], k: int) -> pd.DataFrame:
    """Every pair of methods: Spearman correlation and top-k overlap, one row per pair."""
    rows = []
    for i, first in enumerate(methods):
        for second in methods[i + 1 :]:
            rows.append({"method_a": first.method, "method_b": second.method,
                         "spearman": spearman(first, second),
                         "top_k_overlap": top_k_overlap(first, second, k), "k": k})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ pieces
def flat_scores(values: ScoresLike) -> np.ndarray:
    if isinstance(values, HeadScores):
        values = values.scores
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().numpy()
    flat = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(flat).all():
        raise InputError("scores must be finite (found NaN or inf).")
    return flat


def _shape(values: ScoresLike) -> tuple[int, int]:
    if isinstance(values, HeadScores):
        values = values.scores
    shape = tuple(np.shape(values))
    if len(shape) != 2:
        raise InputError(f"scores must be [layer, head], got shape {list(shape)}.")
    return shape[0], shape[1]


def _labels(positives: Any, n: int, function: str) -> np.ndarray:
    if isinstance(positives, Tensor):
        positives = positives.detach().cpu().numpy()
    labels = np.asarray(positives).ravel()
    if labels.dtype != bool:
        raise InputError(f"{function}: positives must be a boolean [layer, head] mask, got {labels.dtype}.")
    if len(labels) != n:
        raise InputError(f"{function}: positives cover {len(labels)} heads, the scores {n}.")
    return labels


def _check_k(k: Any, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise InputError(f"k must be an integer within [1, {n}], got {k!r}.")
