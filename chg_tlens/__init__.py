"""chg_tlens: Causal Head Gating for TransformerLens.

Learned soft gates on every attention head's ``hook_z`` sort heads into facilitating, interfering and
irrelevant for a task (Nam et al., 2025).

Layers, each importing only those below it: ``app`` > ``analysis`` > ``testbeds`` > ``tasks`` > ``core``
> ``models``. The names notebooks use are re-exported here; the tool modules (``validate``, ``plot``,
``compare``, ``baselines``) load on first use so ``import chg_tlens`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from chg_tlens.core.config import CHGConfig, ContrastiveConfig
from chg_tlens.core.data import GateData
from chg_tlens.core.fit import fit_chg, fit_contrastive_chg
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.result import CHGResult, ContrastiveResult, ResultFileError
from chg_tlens.errors import InputError
from chg_tlens.models.load import load_model

__version__ = "0.1.0"

_TOOL_MODULES = {
    "validate": "chg_tlens.analysis.validate",
    "baselines": "chg_tlens.analysis.baselines",
    "compare": "chg_tlens.analysis.compare",
    "plot": "chg_tlens.app.plot",
}


def __getattr__(name: str) -> Any:
    """The tool modules, ``task_accuracy`` and ``error_bars``, imported when first asked for."""
    if name in _TOOL_MODULES:
        return importlib.import_module(_TOOL_MODULES[name])
    if name == "task_accuracy":
        from chg_tlens.analysis.accuracy import task_accuracy

        return task_accuracy
    if name == "error_bars":
        from chg_tlens.analysis.error_bars import error_bars

        return error_bars
    raise AttributeError(f"module 'chg_tlens' has no attribute {name!r}")


__all__ = [
    "CHGConfig",
    "CHGResult",
    "ContrastiveConfig",
    "ContrastiveResult",
    "GateData",
    "HeadGates",
    "InputError",
    "ResultFileError",
    "error_bars",
    "fit_chg",
    "fit_contrastive_chg",
    "load_model",
    "task_accuracy",
]
