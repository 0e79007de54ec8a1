"""Rank statistics for head scores: do two methods agree, and does a method find the known heads?

    spearman, top_k_overlap        do two methods rank heads alike?
    roc_auc, precision_at_k        does a method find the heads known to matter?
    sweep_roc                      the same for a method that returns kept sets over a threshold sweep (ACDC)
    rank_rows, roc_auc_rows, spearman_rows   the same statistics for many score tables at once
                                   (one per row: bootstrap resamples, ``chg_tlens.analysis.statistics``)

Written out in numpy (average ranks for ties) and checked on hand-made examples in the tests. The
single-table functions call the row-wise ones, so each statistic is computed one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float
from torch import Tensor

from chg_tlens.analysis.baselines import HeadScores
from chg_tlens.errors import InputError

ScoresLike = HeadScores | Tensor | np.ndarray


# ------------------------------------------------------------------------------ rank statistics
def average_ranks(values: ScoresLike) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties sharing the mean of the ranks they span."""
    return rank_rows(flat_scores(values)[None])[0]


def rank_rows(values: Float[np.ndarray, "row n"]) -> Float[np.ndarray, "row n"]:
    """Average ranks (1..n, ties share the mean of the ranks they span) of each row on its own.

    Vectorised over rows so thousands of bootstrap resamples rank in one call: after sorting, each
    entry's tie group runs from the last group start at or before it to the first group end at or
    after it, and its rank is the middle of that run.
    """
    values = np.asarray(values, dtype=float)
    n = values.shape[1]
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    index = np.broadcast_to(np.arange(n), ordered.shape)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones(ordered.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, index, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(ordered.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks


def spearman(a: ScoresLike, b: ScoresLike) -> float:
    """Spearman rank correlation of two score tables (Pearson on average ranks); NaN if one is flat."""
    fa, fb = flat_scores(a), flat_scores(b)
    if len(fa) != len(fb):
        raise InputError(f"spearman: the score tables hold {len(fa)} and {len(fb)} heads.")
    return float(spearman_rows(fa[None], fb[None])[0])


def spearman_rows(a: Float[np.ndarray, "row n"], b: Float[np.ndarray, "row n"]) -> Float[np.ndarray, " row"]:
    """Spearman correlation of ``a[i]`` with ``b[i]`` for every row; NaN where a row is flat."""
    ra, rb = rank_rows(a), rank_rows(b)
    if ra.shape != rb.shape:
        raise InputError(f"spearman: the score tables are {list(ra.shape)} and {list(rb.shape)}.")
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    flat = denominator <= 0
    return np.where(flat, np.nan, (ra * rb).sum(axis=1) / np.where(flat, 1.0, denominator))


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
    return float(roc_auc_rows(flat_scores(scores)[None], positives)[0])


def roc_auc_rows(
    scores: Float[np.ndarray, "row n"], positives: Bool[Tensor, "layer head"] | np.ndarray
) -> Float[np.ndarray, " row"]:
    """:func:`roc_auc` of every row of ``scores`` against the same positives."""
    scores = np.asarray(scores, dtype=float)
    labels = _labels(positives, scores.shape[1], "roc_auc")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(
            f"roc_auc: needs at least one positive and one negative head, got {n_pos} and {n_neg}."
        )
    ranks = rank_rows(scores)
    return (ranks[:, labels].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


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
