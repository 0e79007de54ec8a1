"""chg_tlens: Causal Head Gating for TransformerLens.

Learned soft gates on every attention head's ``hook_z`` sort heads into facilitating, interfering and
irrelevant for a task (Nam et al., 2025).
"""

from chg_tlens.data import GateData
from chg_tlens.fit import CHGConfig, ContrastiveConfig, fit_chg, fit_contrastive_chg
from chg_tlens.gates import HeadGates
from chg_tlens.models import load_model
from chg_tlens.result import CHGResult, ContrastiveResult, ResultFileError

__version__ = "0.1.0"

__all__ = [
    "CHGConfig",
    "CHGResult",
    "ContrastiveConfig",
    "ContrastiveResult",
    "GateData",
    "HeadGates",
    "ResultFileError",
    "fit_chg",
    "fit_contrastive_chg",
    "load_model",
]
