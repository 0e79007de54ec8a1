"""Comparing head scores: method against method, method against known roles, and by what they keep.

    spearman, top_k_overlap        do two methods rank heads alike?
    roc_auc, precision_at_k        does a method find the heads known to matter?
    faithfulness_curve             how much of the task do a method's top-k heads carry on their own?
    chg_head_scores, run_chg       CHG facilitation as one more ``HeadScores``
    run_methods                    every method of ``chg_tlens.baselines`` plus CHG on one model and task

The rank statistics are written out here in numpy (average ranks for ties), so they have no
dependency beyond numpy and are checked on hand-made examples in the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from chg_tlens import adapter, baselines
from chg_tlens.baselines import HeadScores
from chg_tlens.data import GateData
from chg_tlens.fit import CHGConfig, fit_chg
from chg_tlens.result import CHGResult
from chg_tlens.validate import evaluate_gates

SeedReduce = Literal["max", "mean"]
ScoresLike = HeadScores | Tensor | np.ndarray


# ------------------------------------------------------------------------------ rank statistics
def average_ranks(values: ScoresLike) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties sharing the mean of the ranks they span."""
    flat = _flat(values)
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
        raise ValueError(f"spearman: the score tables hold {len(ra)} and {len(rb)} heads.")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def top_k_heads(scores: ScoresLike, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring ``(layer, head)``; ties go to the earlier head (row-major)."""
    shape = _shape(scores)
    flat = _flat(scores)
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
    flat = _flat(scores)
    labels = _labels(positives, len(flat), "roc_auc")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
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
    flat = _flat(scores)
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


# ------------------------------------------------------------------------------ faithfulness
def faithfulness_curve(
    model: Any,
    data: GateData,
    scores: ScoresLike,
    ks: Sequence[int] | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The task with only a method's top-k heads kept (every other head gated to 0), for each k.

    Columns: k, logprob (mean target log-prob), accuracy, faithfulness = (logprob - none) / (all -
    none), where "all" keeps every head and "none" none: 1 = the top k carry the whole task, above 1
    = they do better than the full model (the interfering heads are out).
    """
    layout = adapter.require_model(model)
    flat = _flat(scores)
    n_total = layout.n_layers * layout.n_heads
    if len(flat) != n_total:
        raise ValueError(
            f"faithfulness_curve: scores hold {len(flat)} heads, the model has {n_total} "
            f"({layout.n_layers} layers x {layout.n_heads} heads)."
        )
    ks = list(range(n_total + 1)) if ks is None else [int(k) for k in ks]
    for k in ks:
        if not 0 <= k <= n_total:
            raise ValueError(f"faithfulness_curve: every k must be within [0, {n_total}], got {k}.")
    order = np.argsort(-flat, kind="stable")
    settings = [torch.ones(n_total), torch.zeros(n_total)]
    for k in ks:
        keep = torch.zeros(n_total)
        keep[torch.as_tensor(order[:k].copy(), dtype=torch.long)] = 1.0
        settings.append(keep)
    values = torch.stack(settings).reshape(-1, layout.n_layers, layout.n_heads)
    logprob, accuracy = evaluate_gates(model, data, values, batch_size)
    full, none = float(logprob[0]), float(logprob[1])
    gap = full - none
    rows = []
    for i, k in enumerate(ks):
        value = float(logprob[2 + i])
        rows.append({"k": k, "logprob": value, "accuracy": float(accuracy[2 + i]),
                     "faithfulness": (value - none) / gap if abs(gap) > 1e-12 else float("nan"),
                     "logprob_all": full, "logprob_none": none})
    return pd.DataFrame(rows)


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


# ------------------------------------------------------------------------------ CHG as a method
def chg_head_scores(result: CHGResult, reduce: SeedReduce = "max") -> HeadScores:
    """CHG facilitation (``G-``) reduced over seeds: ``max`` (a head some seed needs) or ``mean``.

    ``details["role_labels"]`` keeps CHG's own ``[seed, layer, head]`` role names (threshold 0.5).
    The cost is what the fit recorded: three stages of ``steps`` updates of ``batch_size`` examples,
    each repeated once per seed.
    """
    if not isinstance(result, CHGResult):
        raise TypeError(f"result: expected a CHGResult, got {type(result).__name__}.")
    if reduce == "max":
        scores = result.facilitating.max(dim=0).values
    elif reduce == "mean":
        scores = result.facilitating.mean(dim=0)
    else:
        raise ValueError(f"chg_head_scores: reduce must be 'max' or 'mean', got {reduce!r}.")
    config = result.config
    passes = 3 * int(config.get("steps", 0)) * int(config.get("batch_size", 0)) * result.n_seeds
    return HeadScores(scores.detach().float().cpu(), f"chg_{reduce}", passes, passes,
                      float(result.provenance.get("seconds", 0.0)), signed=False,
                      details={"n_seeds": result.n_seeds, "reduce": reduce,
                               "role_labels": result.role_labels()})


def run_chg(
    model: Any, data: GateData, config: CHGConfig | None = None
) -> tuple[list[HeadScores], CHGResult]:
    """Fit CHG once and read it both ways (max and mean over seeds); the fit is returned too."""
    config = config or CHGConfig(n_seeds=4, steps=150, batch_size=32, progress=False)
    started = time.time()
    result = fit_chg(model, data, config)
    seconds = time.time() - started
    scored = [chg_head_scores(result, reduce) for reduce in ("max", "mean")]
    for item in scored:
        item.seconds = seconds
    return scored, result


# ------------------------------------------------------------------------------ all methods at once
@dataclass
class MethodSettings:
    """Sizes of every method in :func:`run_methods`, small enough for a CPU by default."""

    batch_size: int = 32
    subnetwork_steps: int = 300
    subnetwork_l0_weight: float = 1.0
    chg: CHGConfig = field(default_factory=lambda: CHGConfig(n_seeds=4, steps=150, batch_size=32,
                                                             progress=False))
    random_seed: int = 0


MethodFn = Callable[[Any, GateData, MethodSettings], list[HeadScores]]


def _single(fn: Callable[..., HeadScores], **kwargs: Any) -> MethodFn:
    def run(model: Any, data: GateData, settings: MethodSettings) -> list[HeadScores]:
        return [fn(model, data, **kwargs, batch_size=settings.batch_size)]

    return run


METHODS: dict[str, tuple[MethodFn, bool]] = {
    "chg": (lambda model, data, settings: run_chg(model, data, settings.chg)[0], False),
    "gradient_importance": (_single(baselines.gradient_importance), False),
    "ablation_zero": (_single(baselines.ablation_scores, kind="zero"), False),
    "ablation_mean": (_single(baselines.ablation_scores, kind="mean"), False),
    "activation_patching_denoise": (_single(baselines.activation_patching, direction="denoise"), True),
    "activation_patching_noise": (_single(baselines.activation_patching, direction="noise"), True),
    "attribution_patching": (_single(baselines.attribution_patching), True),
    "subnetwork_probing": (
        lambda model, data, settings: [baselines.subnetwork_probing(
            model, data, steps=settings.subnetwork_steps, l0_weight=settings.subnetwork_l0_weight,
            batch_size=settings.batch_size, seed=settings.random_seed)],
        False,
    ),
    "random": (lambda model, data, settings: [baselines.random_scores(model, settings.random_seed)], False),
}
"""Name -> (runner, needs a corrupt twin). A runner may return several readings (CHG: max and mean)."""


def run_methods(
    model: Any,
    data: GateData,
    names: Sequence[str] | None = None,
    settings: MethodSettings | None = None,
) -> tuple[list[HeadScores], dict[str, str]]:
    """Run the named methods (all by default); those that need ``data.corrupt`` are skipped without one.

    Returns the scores and, per skipped method, why.
    """
    names = list(METHODS) if names is None else list(names)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"run_methods: unknown method(s) {unknown}; choose from {list(METHODS)}.")
    settings = settings or MethodSettings()
    scored: list[HeadScores] = []
    skipped: dict[str, str] = {}
    for name in names:
        runner, needs_twin = METHODS[name]
        if needs_twin and data.corrupt is None:
            skipped[name] = "the data has no corrupt twin"
            continue
        scored.extend(runner(model, data, settings))
    return scored, skipped


# ------------------------------------------------------------------------------ pieces
def _flat(values: ScoresLike) -> np.ndarray:
    if isinstance(values, HeadScores):
        values = values.scores
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().numpy()
    flat = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(flat).all():
        raise ValueError("scores must be finite (found NaN or inf).")
    return flat


def _shape(values: ScoresLike) -> tuple[int, int]:
    if isinstance(values, HeadScores):
        values = values.scores
    shape = tuple(np.shape(values))
    if len(shape) != 2:
        raise ValueError(f"scores must be [layer, head], got shape {list(shape)}.")
    return shape[0], shape[1]


def _labels(positives: Any, n: int, function: str) -> np.ndarray:
    if isinstance(positives, Tensor):
        positives = positives.detach().cpu().numpy()
    labels = np.asarray(positives).ravel()
    if labels.dtype != bool:
        raise TypeError(f"{function}: positives must be a boolean [layer, head] mask, got {labels.dtype}.")
    if len(labels) != n:
        raise ValueError(f"{function}: positives cover {len(labels)} heads, the scores {n}.")
    return labels


def _check_k(k: Any, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer within [1, {n}], got {k!r}.")


