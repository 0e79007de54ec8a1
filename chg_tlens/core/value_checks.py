"""Checks of plain values (numbers, seeds, head lists, example weights), the bottom of core.

They know no chg_tlens type, so every core module may use them, the result and the data included;
:mod:`chg_tlens.core.checks` re-exports them beside the checks of GateData, HeadGates and CHGResult,
which must import those types. Each raises :class:`chg_tlens.InputError` naming the argument, what was
expected and what was found, before any compute starts.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from chg_tlens.errors import InputError
from chg_tlens.models import adapter

SeedReduce = Literal["max", "mean", "min"]
"""How per-seed head values become one ``[layer, head]`` map (or an int: that one seed)."""


def positive_int(value: Any, argument: str) -> int:
    """``value`` if it is a positive int (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{argument} must be a positive integer, got {value!r}.")
    return value


def positive_number(value: Any, argument: str) -> float:
    """``value`` if it is a finite number > 0 (not a bool)."""
    if not is_positive_number(value):
        raise InputError(f"{argument} must be a positive number, got {value!r}.")
    return float(value)


def is_positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def unit_interval(value: Any, argument: str) -> float:
    """``value`` if it is a number within [0, 1] (a threshold or a confidence)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise InputError(f"{argument} must be within [0, 1], got {value!r}.")
    return float(value)


def seed_index(value: Any, n_seeds: int, argument: str = "seed") -> int:
    """A seed index into ``[0, n_seeds)``; negative indices count from the end, as in Python."""
    if not isinstance(value, int) or isinstance(value, bool) or not -n_seeds <= value < n_seeds:
        raise InputError(f"{argument} must be a seed index in [0, {n_seeds}), got {value!r}.")
    return value % n_seeds


def reduce_seeds(
    per_seed: Float[Tensor, "seed layer head"], how: SeedReduce | int, argument: str = "seed_reduce"
) -> Float[Tensor, "layer head"]:
    """One map from per-seed maps: the max, mean or min over seeds, or one seed's own."""
    if isinstance(how, int) and not isinstance(how, bool):
        return per_seed[seed_index(how, per_seed.shape[0], argument)]
    if how == "max":
        return per_seed.max(dim=0).values
    if how == "mean":
        return per_seed.mean(dim=0)
    if how == "min":
        return per_seed.min(dim=0).values
    raise InputError(f"{argument}: expected 'max', 'mean', 'min' or a seed index, got {how!r}.")


def heads(values: Any, layout: adapter.HeadLayout, argument: str, allow_empty: bool = True
          ) -> list[tuple[int, int]]:
    """``(layer, head)`` pairs within the model, in the order given, without duplicates."""
    try:
        pairs = [(int(layer), int(head)) for layer, head in values]
    except (TypeError, ValueError):
        raise InputError(f"{argument}: expected a list of (layer, head) pairs, got {values!r}.") from None
    if not pairs and not allow_empty:
        raise InputError(f"{argument}: expected at least one (layer, head) pair, got none.")
    outside = [p for p in pairs if not (0 <= p[0] < layout.n_layers and 0 <= p[1] < layout.n_heads)]
    if outside:
        raise InputError(
            f"{argument}: heads {outside[:5]} lie outside the model's {layout.n_layers} layers x "
            f"{layout.n_heads} heads."
        )
    if len(set(pairs)) != len(pairs):
        raise InputError(f"{argument}: a head is listed twice in {pairs}.")
    return pairs


def instance_of(value: Any, kind: type, argument: str, name: str) -> Any:
    """``value`` if it is a ``kind``; ``name`` is how the message writes the type."""
    if not isinstance(value, kind):
        raise InputError(f"{argument}: expected a {name}, got {type(value).__name__}.")
    return value


def sized_for_model(
    value: Any, kind: type, name: str, layout: adapter.HeadLayout, argument: str, mismatch: str
) -> Any:
    """``value`` if it is a ``kind`` with the model's layers and heads (``n_layers``, ``n_heads``).

    ``mismatch`` is the message for another size, formatted with ``found`` and ``model``, each
    ``[layers, heads]``.
    """
    instance_of(value, kind, argument, name)
    found, model = [value.n_layers, value.n_heads], [layout.n_layers, layout.n_heads]
    if found != model:
        raise InputError(f"{argument}: " + mismatch.format(found=found, model=model))
    return value


def example_weights(weights: Tensor | None, n_seeds: int, n_examples: int) -> Tensor | None:
    """Refuse example weights of the wrong shape, negative, non-finite, or all zero for a seed."""
    if weights is None:
        return None
    weights = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
    if list(weights.shape) != [n_seeds, n_examples]:
        raise InputError(f"example_weights must have shape [seed, example] = {[n_seeds, n_examples]}, "
                         f"got {list(weights.shape)}.")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise InputError("example_weights must be finite and >= 0.")
    if (weights.sum(dim=1) <= 0).any():
        raise InputError("example_weights: every seed needs some weight (a row sums to 0).")
    return weights
