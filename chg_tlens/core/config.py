"""One dataclass per fit, the paper's defaults, a docstring per field; ``validate()`` before compute."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from chg_tlens.core import checks
from chg_tlens.core.objectives import ClampMode
from chg_tlens.errors import InputError

OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"trace_every": 10, "early_stop": False, "patience": 100},
    "lbfgs": {"trace_every": 1, "early_stop": True, "patience": 10},
}
"""What the fields left at None become for each optimiser (``validate`` fills them in)."""


@dataclass
class GateFitConfig:
    """Settings every gate fit shares."""

    n_seeds: int = 10
    """Independent gate sets (masks), each with its own uniform initial draw; trained in one pass."""
    optimizer: Literal["adam", "lbfgs"] = "adam"
    """'adam' (the paper's: minibatch Adam, learning rate decaying linearly over ``steps``) or 'lbfgs'
    (full-data L-BFGS per mask with a line search, within the box [-clamp, clamp] of the gate logits:
    no learning rate, deterministic, stops once the stage is certified; see the README's convergence
    section)."""
    batch_size: int = 64
    """Examples per Adam update (each repeated once per seed inside the forward pass); L-BFGS uses
    every example in every iteration and ignores it."""
    micro_batch_size: int | None = None
    """Examples per forward pass; an update accumulates the gradient over its micro-batches, so the
    examples per update are free of memory (the same gates as one big batch). None: one forward per
    update (Adam) or per ``batch_size`` examples (L-BFGS)."""
    steps: int = 500
    """Updates (Adam) or iterations (L-BFGS) in each stage: the ceiling when a stage stops early."""
    lam: float = 0.1
    """Regulariser strength (>= 0); the sign each stage uses is part of the method, not a setting."""
    clamp: float = 4.0
    """Clamp on the gate logits inside the regulariser, so it stops once a gate is clearly set."""
    clamp_mode: ClampMode = "one_sided"
    """'one_sided' (default: pull never stops short of its side) or 'two_sided' (the reference's
    clamp(theta, -c, c), which can freeze gates that stage 1 pushed past -c; see CHG_METHOD.md)."""
    grad_clip: float = 1.0
    """Gradient-norm clip of an Adam update, applied to each seed's gates separately."""
    seed: int = 0
    """Seeds the initial gates and the batch order; same seed and data give the same gates."""
    device: str | None = None
    """Where to run; None means the model's own device."""
    progress: bool = True
    """Show tqdm progress bars."""
    checkpoint_every: int = 50
    """Updates between checkpoints when the fit is given a run folder."""
    autocast: Literal["bfloat16", "float16"] | None = None
    """Run the model's forward under torch.autocast in this dtype (GPU speed-up); None = model dtype."""
    bucket_window: int = 1
    """Length bucketing: sort windows of this many batches by length (1 = off). 8 cuts padding from
    ~35% to ~8% of tokens on mixed-length data; single-template tasks hardly need it."""
    trace_every: int | None = None
    """Updates between the gate snapshots a result keeps (its convergence trace; early stopping reads
    it too). The start and the end of every stage are always kept. None: 10 (Adam), 1 (L-BFGS)."""
    early_stop: bool | None = None
    """End a stage as soon as it is certified (the same certificate the result reports, read on the
    trace so far); ``steps`` is the ceiling. None: off for Adam (the paper runs every step; its
    learning-rate schedule is tied to ``steps``), on for L-BFGS."""
    patience: int | None = None
    """Shortest certificate window in updates: no head may change state within it. None: 100 (Adam),
    10 (L-BFGS, whose iterations each use all the data and a line search)."""
    stop_tolerance: float = 0.01
    """Largest mean |change of G| over the window (carried on for ``patience`` updates) that still
    counts as still."""
    grad_tolerance: float = 0.1
    """Largest stationarity residual of any head, in units of the regulariser's pull on one gate logit
    (lam / n_heads), that still certifies a stage."""
    lbfgs_memory: int = 100
    """Curvature pairs L-BFGS keeps per mask (the gate logits are few: 100 pairs of 270 numbers for
    SmolLM2-135M cost nothing next to a forward pass)."""
    role_threshold: float = 0.5
    """Score that gives a head a role while fitting (early stopping, the certificate); results take
    their own threshold when read."""

    def validate(self) -> GateFitConfig:
        """Reject impossible settings before any compute, naming the field; return a copy with the fields
        left at None set to their optimiser's defaults (this config stays as it was, so it can be reused
        with another optimiser). Checks settings only: checking a fit's roles is ``chg_tlens.validate``
        (the name is shared on purpose; see ``chg_tlens``' docstring)."""
        name = type(self).__name__
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise InputError(f"{name}.optimizer must be 'adam' or 'lbfgs', got {self.optimizer!r}.")
        resolved = replace(self)
        for key, default in OPTIMIZER_DEFAULTS[self.optimizer].items():
            if getattr(resolved, key) is None:
                setattr(resolved, key, default)
        resolved._check()
        return resolved

    def _check(self) -> None:
        name = type(self).__name__
        if self.micro_batch_size is not None:
            checks.positive_int(self.micro_batch_size, f"{name}.micro_batch_size")
        for key in ("n_seeds", "batch_size", "steps", "checkpoint_every", "bucket_window", "trace_every",
                    "patience", "lbfgs_memory"):
            checks.positive_int(getattr(self, key), f"{name}.{key}")
        for key in self._learning_rates():
            value = tuple(getattr(self, key)) if isinstance(getattr(self, key), (tuple, list)) else ()
            if len(value) != 2 or not all(checks.is_positive_number(v) for v in value):
                raise InputError(
                    f"{name}.{key} must be two positive learning rates (start, end), "
                    f"got {getattr(self, key)!r}."
                )
        checks.positive_number(self.stop_tolerance, f"{name}.stop_tolerance")
        checks.positive_number(self.grad_tolerance, f"{name}.grad_tolerance")
        checks.unit_interval(self.role_threshold, f"{name}.role_threshold")
        for spec in fields(self):  # every flag, not only early_stop: the string "False" is truthy
            value = getattr(self, spec.name)
            if spec.type in ("bool", "bool | None", bool) and not isinstance(value, bool):
                raise InputError(f"{name}.{spec.name} must be True or False, got {value!r}.")
        if not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) or self.lam < 0:
            raise InputError(f"{name}.lam must be >= 0 (each stage applies its own sign), got {self.lam!r}.")
        for key in ("clamp", "grad_clip"):
            checks.positive_number(getattr(self, key), f"{name}.{key}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise InputError(f"{name}.autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}.")
        if self.clamp_mode not in ("one_sided", "two_sided"):
            raise InputError(
                f"{name}.clamp_mode must be 'one_sided' or 'two_sided', got {self.clamp_mode!r}."
            )

    def _learning_rates(self) -> tuple[str, ...]:
        return ()


@dataclass
class CHGConfig(GateFitConfig):
    """Settings of a three-stage CHG fit; defaults are the paper's (Nam et al. 2025)."""

    lr_zero: tuple[float, float] = (0.1, 0.01)
    """Stage 1 (lambda = 0) learning rate, decaying linearly from the first to the second value."""
    lr_reg: tuple[float, float] = (0.5, 0.1)
    """G+ and G- learning rate, decaying linearly from the first to the second value."""
    objective: Literal["nll", "contrast"] = "nll"
    """The data term the gates are fitted on. 'nll' (the paper's): each example's target NLL, from the
    clean prompt alone. 'contrast': ``-log sigmoid(logit[answer] - logit[corrupt answer])``, the
    clean-vs-corrupt contrast patching methods measure, read from the data's corrupt twin (same target
    positions): heads every next-token prediction needs, which raise both answers alike, drop out, and
    what remains is the part of the task the twin removes."""
    fuse_regularised: bool = True
    """Fit G+ and G- as one stage of 2 x n_seeds masks (each with its own lambda sign) on the same
    batches: one forward/backward per update instead of two, the same arithmetic as two stages."""

    def _check(self) -> None:
        super()._check()
        if self.objective not in ("nll", "contrast"):
            raise InputError(f"CHGConfig.objective must be 'nll' or 'contrast', got {self.objective!r}.")

    def _learning_rates(self) -> tuple[str, ...]:
        return ("lr_zero", "lr_reg")


@dataclass
class ContrastiveConfig(GateFitConfig):
    """Settings of contrastive CHG; defaults are the paper's."""

    n_seeds: int = 4
    """Independent gate sets trained at once."""
    lr: tuple[float, float] = (0.1, 0.01)
    """Learning rate, decaying linearly from the first to the second value."""
    logprob_clamp: float = 5.0
    """The forget-minus-retain log-prob gap stops pulling once it is this many nats below zero."""
    threshold: float = 0.5
    """A head counts as closed when its gate ends below this value."""

    def _check(self) -> None:
        super()._check()
        checks.positive_number(self.logprob_clamp, "ContrastiveConfig.logprob_clamp")
        checks.unit_interval(self.threshold, "ContrastiveConfig.threshold")

    def _learning_rates(self) -> tuple[str, ...]:
        return ("lr",)


def config_record(config: Any) -> dict[str, Any]:
    """A JSON-friendly copy of a config dataclass."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
