"""How sure is a comparison of methods? Bootstrap intervals over prompts for AUC and rank correlations.

A method's head scores come from a finite set of prompts, so the honest uncertainty of anything read
off them (its AUC against known roles, its Spearman correlation with CHG, the gap between two
methods' AUCs) comes from which prompts were drawn: the bootstrap here resamples prompts, never heads.

    bootstrap                  any statistic of one or more methods' scores, one shared resample each time
    bootstrap_auc              ROC AUC against known positives
    bootstrap_auc_difference   AUC of method a minus AUC of method b, paired (same prompts for both)
    bootstrap_spearman         rank correlation of two methods (or of one method with a fixed table)

A method enters as its per-example scores ``[example, layer, head]`` whose mean over examples is its
score (ablation, patching, attribution and HISP are such means), as a ``HeadScores`` carrying them in
``details["per_example"]``, as a fixed ``[layer, head]`` table (it does not move with the prompts),
or as a callable ``indices -> [layer, head]`` that recomputes the method on the resampled prompts
(``np.bincount(indices, minlength=n)`` gives them as example weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from chg_tlens.analysis.baselines import PER_EXAMPLE, HeadScores
from chg_tlens.analysis.metrics import flat_scores, roc_auc_rows, spearman_rows
from chg_tlens.core import checks
from chg_tlens.errors import InputError

Resampler = Callable[[Int[np.ndarray, " example"]], Any]
Source = HeadScores | Tensor | np.ndarray | Resampler
"""One method: per-example scores ``[example, layer, head]``, a fixed ``[layer, head]`` table, a
``HeadScores`` (its ``details["per_example"]``) or a callable from resampled example indices to scores."""
Statistic = Callable[..., Float[np.ndarray, " row"]]
"""Maps one ``[row, head]`` array per source (row = a resample, heads flattened) to one value per row."""


@dataclass(frozen=True)
class Interval:
    """A statistic on all prompts and its percentile interval over bootstrap resamples of the prompts."""

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    samples: Float[np.ndarray, " boot"]

    def covers(self, value: float) -> bool:
        return bool(self.low <= value <= self.high)

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "n_boot": self.n_boot}


def resample_indices(n_examples: int, n_boot: int, seed: int = 0) -> Int[np.ndarray, "boot example"]:
    """``n_boot`` resamples of ``n_examples`` prompts with replacement; the same seed gives the same draws."""
    checks.positive_int(n_examples, "n_examples")
    checks.positive_int(n_boot, "n_boot")
    return np.random.default_rng(seed).integers(0, n_examples, size=(n_boot, n_examples))


def bootstrap(
    sources: Sequence[Source],
    statistic: Statistic,
    n_boot: int = 1000,
    level: float = 0.9,
    seed: int = 0,
    n_examples: int | None = None,
) -> Interval:
    """``statistic`` of the sources on all prompts, and its ``level`` percentile interval over ``n_boot``
    resamples of the prompts.

    Every source is read on the same resample each time, so a difference between two methods keeps
    their pairing (both moved by the same prompts) and its interval is not inflated by the part of
    their noise they share. ``n_examples`` is needed only when no source holds per-example scores.
    """
    if not sources:
        raise InputError("bootstrap: sources must name at least one method.")
    if not 0.0 < level < 1.0:
        raise InputError(f"bootstrap: level must be within (0, 1), got {level!r}.")
    readers = [_reader(source) for source in sources]
    n = _example_count([size for _, size in readers], n_examples)
    everything = np.arange(n)[None]
    estimate = float(np.asarray(statistic(*(read(everything) for read, _ in readers)))[0])
    resamples = resample_indices(n, n_boot, seed)
    samples = np.asarray(statistic(*(read(resamples) for read, _ in readers)), dtype=float)
    if samples.shape != (n_boot,):
        raise InputError(f"bootstrap: statistic must return one value per resample ({n_boot}), "
                         f"got shape {list(samples.shape)}.")
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level, n_boot, samples)


def bootstrap_auc(
    scores: Source, positives: Bool[Tensor, "layer head"] | np.ndarray, **options: Any
) -> Interval:
    """ROC AUC of a method against the known ``positives``, with its interval over prompts."""
    return bootstrap([scores], lambda rows: roc_auc_rows(rows, positives), **options)


def bootstrap_auc_difference(
    a: Source, b: Source, positives: Bool[Tensor, "layer head"] | np.ndarray, **options: Any
) -> Interval:
    """AUC of ``a`` minus AUC of ``b`` with the paired interval: both read on the same resampled prompts."""
    return bootstrap([a, b], lambda rows_a, rows_b: roc_auc_rows(rows_a, positives)
                     - roc_auc_rows(rows_b, positives), **options)


def bootstrap_spearman(a: Source, b: Source, **options: Any) -> Interval:
    """Spearman correlation of two methods (either may be a fixed ``[layer, head]`` table, e.g. CHG's
    scores), with its interval over prompts."""
    return bootstrap([a, b], spearman_rows, **options)


def per_example_scores(item: HeadScores) -> Float[Tensor, "example layer head"]:
    """A method's per-example scores, checked to average to its scores (else they would be something else)."""
    per_example = item.details.get(PER_EXAMPLE)
    if per_example is None:
        raise InputError(
            f"{item.method}: its HeadScores hold no details[{PER_EXAMPLE!r}] ([example, layer, head] scores "
            "averaging to its scores), so its interval over prompts cannot be taken; pass the per-example "
            "tensor or a callable that recomputes the method on resampled prompts instead."
        )
    per_example = torch.as_tensor(per_example).detach().float().cpu()
    if per_example.ndim != 3 or tuple(per_example.shape[1:]) != tuple(item.scores.shape):
        raise InputError(f"{item.method}: details[{PER_EXAMPLE!r}] must be [example, layer, head] with "
                         f"[layer, head] = {list(item.scores.shape)}, got {list(per_example.shape)}.")
    if not torch.allclose(per_example.mean(dim=0), item.scores.float().cpu(), rtol=1e-4, atol=1e-6):
        raise InputError(f"{item.method}: details[{PER_EXAMPLE!r}] does not average to its scores.")
    return per_example


# ------------------------------------------------------------------------------ pieces
Reader = Callable[[Int[np.ndarray, "row example"]], Float[np.ndarray, "row head"]]


def _reader(source: Source) -> tuple[Reader, int | None]:
    """How to read a source's ``[row, head]`` scores on resampled prompts, and how many prompts it holds."""
    if isinstance(source, HeadScores):
        source = per_example_scores(source)
    if callable(source) and not isinstance(source, (Tensor, np.ndarray)):
        return _recomputed(source), None
    if isinstance(source, Tensor):
        source = source.detach().float().cpu().numpy()
    values = np.asarray(source, dtype=float)
    if values.ndim == 2:
        fixed = flat_scores(values)
        return (lambda indices: np.broadcast_to(fixed, (len(indices), len(fixed)))), None
    if values.ndim != 3:
        raise InputError(f"bootstrap: a source must be [example, layer, head] or [layer, head], got shape "
                         f"{list(values.shape)}.")
    flat = values.reshape(values.shape[0], -1)
    if not np.isfinite(flat).all():
        raise InputError("bootstrap: per-example scores must be finite (found NaN or inf).")
    return _resampled_mean(flat), values.shape[0]


def _resampled_mean(flat: Float[np.ndarray, "example head"]) -> Reader:
    """The mean over each resample's prompts (repeats counted), as one matrix product."""
    n = flat.shape[0]

    def read(indices: Int[np.ndarray, "row example"]) -> Float[np.ndarray, "row head"]:
        rows = len(indices)
        offsets = (indices + n * np.arange(rows)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=rows * n).reshape(rows, n)
        return counts @ flat / indices.shape[1]

    return read


def _recomputed(method: Resampler) -> Reader:
    def read(indices: Int[np.ndarray, "row example"]) -> Float[np.ndarray, "row head"]:
        return np.stack([flat_scores(method(row)) for row in indices])

    return read


def _example_count(sizes: list[int | None], n_examples: int | None) -> int:
    known = {size for size in sizes if size is not None}
    if n_examples is not None:
        checks.positive_int(n_examples, "n_examples")
        known.add(n_examples)
    if len(known) > 1:
        raise InputError(f"bootstrap: the sources hold different numbers of examples {sorted(known)}; a "
                         "paired resample needs the same prompts in every method.")
    if not known:
        raise InputError("bootstrap: no source holds per-example scores; give n_examples.")
    return known.pop()
