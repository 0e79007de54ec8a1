"""chg_tlens: Causal Head Gating for TransformerLens.

Learned soft gates on every attention head's ``hook_z`` sort heads into facilitating, interfering and
irrelevant for a task (Nam et al., 2025).

Layers, each importing only those below it: ``app`` > ``analysis`` > ``testbeds`` > ``tasks`` > ``core``
> ``models``. The names notebooks use are re-exported here, so a notebook needs no deeper import for them;
the tool modules (``validate``, ``plot``, ``compare``, ``baselines``, ``metrics``) and the analysis names
(``task_accuracy``, ``error_bars``, ``evaluate_gates``, ``circuit``, ``Circuit``) load on first use so
``import chg_tlens`` stays light, and ``dir(chg_tlens)`` lists them before they are loaded.

"validate" names two things, kept on purpose: ``chg_tlens.validate`` (the namespace) and ``chg-tlens
validate`` (the command: the namespace's standard set on a run folder) check that a fit's *roles* are causal;
a config's ``validate()`` checks its *settings* before any compute, the word's usual sense on a settings
object. One is a module, the other a method of a config, so they cannot be mistaken for one another in
code, and renaming a public method would cost every caller a deprecation for no change in behaviour.
"""

from __future__ import annotations

import importlib
from typing import Any

from chg_tlens.core.config import CHGConfig, ContrastiveConfig
from chg_tlens.core.data import GateData
from chg_tlens.core.fit import fit_chg, fit_contrastive_chg
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.result import CHGResult, ContrastiveResult
from chg_tlens.core.result_files import ResultFileError
from chg_tlens.errors import InputError
from chg_tlens.models.load import load_model
from chg_tlens.models.protocol import TransformerLensModel

__version__ = "0.1.0"

_TOOL_MODULES = {
    "validate": "chg_tlens.analysis.validate",
    "baselines": "chg_tlens.analysis.baselines",
    "compare": "chg_tlens.analysis.compare",
    "metrics": "chg_tlens.analysis.metrics",
    "plot": "chg_tlens.app.plot",
}


_LAZY_NAMES = {
    "task_accuracy": "chg_tlens.analysis.accuracy",
    "error_bars": "chg_tlens.analysis.error_bars",
    "evaluate_gates": "chg_tlens.analysis.ablation",
    "circuit": "chg_tlens.analysis.circuit",
    "Circuit": "chg_tlens.analysis.circuit",
}
"""Functions (and the ``Circuit`` class) exported here but imported only when first asked for (their modules
pull in pandas and the analysis layer): name -> the module that defines it."""


def __getattr__(name: str) -> Any:
    """The tool modules and the ``_LAZY_NAMES`` functions, imported when first asked for."""
    if name in _TOOL_MODULES:
        return importlib.import_module(_TOOL_MODULES[name])
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'chg_tlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    """What is loaded plus what ``__getattr__`` would load, so completion and ``dir`` show the lazy names."""
    return sorted(set(globals()) | set(_TOOL_MODULES) | set(_LAZY_NAMES))


__all__ = [
    "CHGConfig",
    "CHGResult",
    "Circuit",
    "ContrastiveConfig",
    "ContrastiveResult",
    "GateData",
    "HeadGates",
    "InputError",
    "ResultFileError",
    "TransformerLensModel",
    "circuit",
    "error_bars",
    "evaluate_gates",
    "fit_chg",
    "fit_contrastive_chg",
    "load_model",
    "task_accuracy",
]
