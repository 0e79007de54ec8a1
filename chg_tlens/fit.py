"""Fitting gates: the three CHG stages, all seeds in one pass.

    theta_zero  = fit(lambda = 0)                      # shared starting point
    theta_plus  = fit(lambda = +lam, from theta_zero)  # G+: opening rewarded
    theta_minus = fit(lambda = -lam, from theta_zero)  # G-: closing rewarded
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from chg_tlens import adapter
from chg_tlens.data import GateData
from chg_tlens.gates import HeadGates
from chg_tlens.objectives import ClampMode, chg_loss, per_mask_grad_clip_, target_nll
from chg_tlens.result import CHGResult


@dataclass
class CHGConfig:
    """Settings of a three-stage CHG fit; defaults are the paper's (Nam et al. 2025)."""

    n_seeds: int = 10
    """Independent gate sets (masks), each with its own uniform initial draw; trained in one pass."""
    batch_size: int = 64
    """Examples per update (each repeated once per seed inside the forward pass)."""
    steps: int = 500
    """Adam updates in each of the three stages."""
    lr_zero: tuple[float, float] = (0.1, 0.01)
    """Stage 1 (lambda = 0) learning rate, decaying linearly from the first to the second value."""
    lr_reg: tuple[float, float] = (0.5, 0.1)
    """G+ and G- learning rate, decaying linearly from the first to the second value."""
    lam: float = 0.1
    """Regulariser strength: G+ uses +lam (rewards open gates), G- uses -lam (rewards closed)."""
    clamp: float = 4.0
    """Clamp on the gate logits inside the regulariser, so it stops once a gate is clearly set."""
    clamp_mode: ClampMode = "one_sided"
    """'one_sided' (default: pull never stops short of its side) or 'two_sided' (the reference's
    clamp(theta, -c, c), which can freeze gates that stage 1 pushed past -c; see CHG_METHOD.md)."""
    grad_clip: float = 1.0
    """Gradient-norm clip, applied to each seed's gates separately."""
    seed: int = 0
    """Seeds the initial gates and the batch order; same seed and data give the same gates."""
    device: str | None = None
    """Where to run; None means the model's own device."""
    progress: bool = True
    """Show tqdm progress bars."""

    def validate(self) -> CHGConfig:
        """Reject impossible settings before any compute, naming the field."""
        for name in ("n_seeds", "batch_size", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CHGConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("lr_zero", "lr_reg"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or not all(_positive(v) for v in value):
                raise ValueError(
                    f"CHGConfig.{name} must be two positive learning rates (start, end), got {value!r}."
                )
        if not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(
                f"CHGConfig.lam must be >= 0 (G- uses -lam itself), got {self.lam!r}."
            )
        if not _positive(self.clamp):
            raise ValueError(f"CHGConfig.clamp must be positive, got {self.clamp!r}.")
        if self.clamp_mode not in ("one_sided", "two_sided"):
            raise ValueError(
                f"CHGConfig.clamp_mode must be 'one_sided' or 'two_sided', got {self.clamp_mode!r}."
            )
        if not _positive(self.grad_clip):
            raise ValueError(f"CHGConfig.grad_clip must be positive, got {self.grad_clip!r}.")
        return self


@dataclass
class StageLog:
    """Per-step curves of one stage, ``[step, seed]``."""

    loss: list[Tensor] = field(default_factory=list)
    nll: list[Tensor] = field(default_factory=list)

    def as_tensors(self) -> dict[str, Tensor]:
        return {"loss": torch.stack(self.loss), "nll": torch.stack(self.nll)}


def fit_chg(
    model: Any,
    data: GateData,
    config: CHGConfig | None = None,
    init_theta: Float[Tensor, "seed layer head"] | None = None,
) -> CHGResult:
    """Fit G0, then G+ and G- from it, for ``config.n_seeds`` seeds at once; return the roles.

    ``init_theta`` replaces the uniform initial draw (a warm start, or a planted starting point).
    """
    config = (config or CHGConfig()).validate()
    layout = adapter.require_model(model)
    if init_theta is not None:
        expected = [config.n_seeds, layout.n_layers, layout.n_heads]
        if list(init_theta.shape) != expected:
            raise ValueError(
                f"init_theta must have shape [seed, layer, head] = {expected}, "
                f"got {list(init_theta.shape)}."
            )
    if not isinstance(data, GateData):
        raise TypeError(f"data: expected a chg_tlens.GateData, got {type(data).__name__}.")
    data.checked_for(model)
    device = torch.device(config.device) if config.device else adapter.model_device(model)
    started = time.time()

    with adapter.frozen(model):
        gates = HeadGates(layout.n_layers, layout.n_heads, config.n_seeds, config.seed,
                          theta=init_theta).to(device)
        log_zero = train_gates(model, gates, data, 0.0, config.lr_zero, config, stage="zero")
        theta_zero = gates.theta.detach().clone()
        results = {"zero": (theta_zero, log_zero)}
        for stage, lam in (("plus", config.lam), ("minus", -config.lam)):
            gates = HeadGates(layout.n_layers, layout.n_heads, config.n_seeds, theta=theta_zero)
            gates = gates.to(device)
            log = train_gates(model, gates, data, lam, config.lr_reg, config, stage=stage)
            results[stage] = (gates.theta.detach().clone(), log)

    return CHGResult(
        theta_zero=results["zero"][0].cpu(),
        theta_plus=results["plus"][0].cpu(),
        theta_minus=results["minus"][0].cpu(),
        losses={stage: log.as_tensors() for stage, (_, log) in results.items()},
        config=config_record(config),
        provenance=provenance(model, data, seconds=time.time() - started),
    )


def train_gates(
    model: Any,
    gates: HeadGates,
    data: GateData,
    lam: float,
    lr: tuple[float, float],
    config: CHGConfig,
    stage: str,
) -> StageLog:
    """One stage: Adam on the gate logits with a linearly decaying learning rate."""
    optimizer = torch.optim.Adam([gates.theta], lr=lr[0])
    generator = torch.Generator().manual_seed(config.seed * 1009 + _STAGE_SALT.get(stage, 0))
    stream = data.batches(config.batch_size, generator=generator)
    device = gates.theta.device
    log = StageLog()
    for step in tqdm(range(config.steps), desc=f"CHG {stage}", disable=not config.progress,
                     leave=False):
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(lr, step, config.steps)
        batch = next(stream)
        tokens = batch.tokens.to(device)
        target_mask = batch.target_mask.to(device)
        logits = gated_logits(model, gates, tokens)
        nll = target_nll(logits, tokens, target_mask, gates.n_masks)
        loss = chg_loss(nll, gates.theta, lam, config.clamp, config.clamp_mode)
        if not torch.isfinite(loss).all():
            bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
            raise FloatingPointError(
                f"CHG stage '{stage}', step {step}: the loss is not finite for seed(s) {bad} "
                f"(values {loss.detach().cpu().tolist()}). Check the data and the model's dtype."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        per_mask_grad_clip_(gates.theta.grad, config.grad_clip)
        optimizer.step()
        log.loss.append(loss.detach().cpu())
        log.nll.append(nll.detach().cpu())
    return log


def gated_logits(
    model: Any, gates: HeadGates, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "mask_batch pos vocab"]:
    """Logits of the batch repeated once per mask, each replica under its own gates."""
    with model.hooks(fwd_hooks=gates.hooks()):
        return model(gates.repeat_batch(tokens))


def linear_lr(lr: tuple[float, float], step: int, steps: int) -> float:
    """Linear decay from ``lr[0]`` at the first step to ``lr[1]`` at the last."""
    if steps <= 1:
        return float(lr[0])
    return float(lr[0] + (lr[1] - lr[0]) * step / (steps - 1))


def config_record(config: Any) -> dict[str, Any]:
    """A JSON-friendly copy of a config dataclass."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def provenance(model: Any, data: GateData, seconds: float) -> dict[str, Any]:
    """What a reader needs to trust or reproduce a result: model, data, versions, time."""
    from chg_tlens import __version__

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
            "chg_tlens": __version__,
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


_STAGE_SALT = {"zero": 1, "plus": 2, "minus": 3}


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0
