"""Settings the app layer shares (the CLI's demo and compare, and the benchmarks that time them)."""

from __future__ import annotations

from typing import Any

DEMO_SETTINGS: dict[str, Any] = dict(task="sva", n_examples=8, n_seeds=1, optimizer="lbfgs", steps=1000)
"""``chg-tlens demo`` / ``make demo``: the embedded SmolLM2-135M on subject-verb agreement, fitted to the
convergence certificate: full-data L-BFGS stops each stage once certified (``steps`` is only the
ceiling). Measured by ``benchmarks/optimiser_study.py`` and the demo itself (see the README): no Adam budget
measured on a CPU certified a stage; this one certifies every stage in about 10 minutes on 2 cores (stage
zero at the objective's lower bound at update 179, G+ at 323, G- at 727)."""


CPU_BUDGET: dict[str, Any] = dict(task="sva", n_examples=64, n_seeds=2, batch_size=8, steps=100)
"""The Adam budget the CPU comparisons use (``chg-tlens compare`` and the study scripts): the paper's
schedule cut to what two cores run in minutes. Not certified; the comparisons say so."""


def demo_fit_settings() -> dict[str, Any]:
    """The demo's ``CHGConfig`` fields (the settings above less the task's)."""
    return {key: value for key, value in DEMO_SETTINGS.items() if key not in ("task", "n_examples")}
