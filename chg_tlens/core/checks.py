"""Input checks, written once: every public function asks here, so the same mistake reads the same.

Each check raises :class:`chg_tlens.InputError` naming the argument, what was expected and what was
found, before any compute starts. The checks of plain values live in :mod:`chg_tlens.core.value_checks`
(re-exported here) so the modules this one imports can use them without a cycle; the checks below take
a GateData, HeadGates or CHGResult and so sit above those types.
"""

from __future__ import annotations

from typing import Any

from chg_tlens.core.data import GateData
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.result import CHGResult
from chg_tlens.core.value_checks import (
    SeedReduce,
    example_weights,
    heads,
    instance_of,
    is_positive_number,
    positive_int,
    positive_number,
    reduce_seeds,
    seed_index,
    sized_for_model,
    unit_interval,
)
from chg_tlens.errors import InputError
from chg_tlens.models import adapter

__all__ = [
    "SeedReduce", "chg_result", "corrupt_twin", "example_weights", "gate_data", "gates_for", "heads",
    "instance_of", "is_positive_number", "positive_int", "positive_number", "reduce_seeds", "seed_index",
    "unit_interval",
]


def gate_data(data: Any, model: Any, argument: str = "data") -> GateData:
    """``data`` if it is a GateData whose tokens and lengths fit ``model``."""
    return instance_of(data, GateData, argument, "chg_tlens.GateData").checked_for(model, argument)


def corrupt_twin(data: GateData, method: str, corrupt: Any = None) -> GateData:
    """The corrupt twin patching needs: ``corrupt`` if given, else ``data.corrupt``, same token shape."""
    twin = data.corrupt if corrupt is None else corrupt
    if twin is None:
        raise InputError(
            f"{method}: the data has no corrupt twin (data.corrupt is None) and none was given; attach "
            "one with data.with_corrupt(GateData...) of the same shape."
        )
    if not isinstance(twin, GateData):
        raise InputError(f"{method}: corrupt must be a chg_tlens.GateData, got {type(twin).__name__}.")
    if twin.tokens.shape != data.tokens.shape:
        raise InputError(
            f"{method}: the corrupt twin has tokens of shape {list(twin.tokens.shape)}, the clean data "
            f"{list(data.tokens.shape)}; patching swaps activations position by position."
        )
    return twin


def gates_for(gates: Any, layout: adapter.HeadLayout, argument: str = "gates") -> HeadGates:
    """``gates`` if it is a HeadGates sized for the model's heads."""
    return sized_for_model(
        gates, HeadGates, "chg_tlens.HeadGates", layout, argument,
        "built for {found[0]} layers x {found[1]} heads, but the model has {model[0]} x {model[1]}.",
    )


def chg_result(result: Any, layout: adapter.HeadLayout, argument: str = "result") -> CHGResult:
    """``result`` if it is a CHGResult fitted on a model with this many layers and heads."""
    return sized_for_model(
        result, CHGResult, "CHGResult", layout, argument,
        "gates are [layer, head] = {found}, but the model has {model}; was it fitted on another model?",
    )
