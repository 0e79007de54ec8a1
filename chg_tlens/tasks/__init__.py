"""Built-in tasks: seeded generators that return ``GateData`` for a model, any size.

    data = make_task("sva", model, n=64, seed=0)          # or chg_tlens.tasks.sva(model, n=64)
    data.corrupt                                          # the counterfactual twin, same shapes

Each text task checks that its answer words are single tokens for the model's tokenizer and records
its task name, options, prompts and answers in ``data.meta``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.tasks.aba_abb import aba_abb
from chg_tlens.tasks.arithmetic import arithmetic
from chg_tlens.tasks.function import FunctionViews, contrastive_splits, function, function_views
from chg_tlens.tasks.induction import induction
from chg_tlens.tasks.ioi import ioi
from chg_tlens.tasks.sva import sva

_GENERATORS: dict[str, Callable[..., GateData]] = {
    "ioi": ioi,
    "sva": sva,
    "induction": induction,
    "aba_abb": aba_abb,
    "arithmetic": arithmetic,
    "function": function,
}

TASKS: tuple[str, ...] = tuple(_GENERATORS)
"""Names ``make_task`` accepts."""


def make_task(name: str, model: TransformerLensModel, n: int = 64, seed: int = 0, **options: Any) -> GateData:
    """The task ``name`` for ``model``: ``n`` examples drawn with ``seed``; ``options`` go to the task."""
    if name not in _GENERATORS:
        raise InputError(f"make_task: unknown task {name!r}; the tasks are {list(TASKS)}.")
    generator = _GENERATORS[name]
    accepted = [p for p in inspect.signature(generator).parameters if p not in ("model", "n", "seed")]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise InputError(f"make_task: task {name!r} has no option(s) {unknown}; its options are {accepted}.")
    return generator(model, n=n, seed=seed, **options)


__all__ = [
    "TASKS",
    "FunctionViews",
    "aba_abb",
    "arithmetic",
    "contrastive_splits",
    "function",
    "function_views",
    "induction",
    "ioi",
    "make_task",
    "sva",
]
