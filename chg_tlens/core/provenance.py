"""What a reader needs to trust or reproduce a result: model, data, versions, time."""

from __future__ import annotations

import platform
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

import torch

from chg_tlens.core.data import GateData
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel


def provenance(model: TransformerLensModel, data: GateData, seconds: float) -> dict[str, Any]:
    """What a reader needs to trust or reproduce a result: model, data, versions, time.

    chg_tlens' own version is read from the installed metadata (which pyproject takes from
    ``chg_tlens.__version__``), not from the package's ``__init__``, which sits above core."""
    layout = adapter.require_model(model)
    return {
        "model_name": adapter.model_name(model),
        "model_class": type(model).__name__,
        "n_layers": layout.n_layers,
        "n_heads": layout.n_heads,
        "data_fingerprint": data.fingerprint(),
        "n_examples": len(data),
        "n_targets": data.n_targets,
        "data_meta": {k: v for k, v in data.meta.items() if isinstance(v, (str, int, float, bool))},
        "versions": {
            "chg_tlens": package_version("chg_tlens"),
            "torch": torch.__version__,
            "transformer_lens": package_version("transformer-lens"),
            "python": platform.python_version(),
        },
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def package_version(name: str) -> str:
    """Installed version of a distribution, or "not installed"."""
    try:
        return _dist_version(name)
    except PackageNotFoundError:
        return "not installed"
