"""Fitting gates: the three CHG stages (all seeds in one pass), and contrastive CHG.

    theta_zero  = fit(lambda = 0)                      # shared starting point
    theta_plus  = fit(lambda = +lam, from theta_zero)  # G+: opening rewarded
    theta_minus = fit(lambda = -lam, from theta_zero)  # G-: closing rewarded

Each stage is Adam on the gate logits with a linearly decaying learning rate. With a ``run_dir`` the
loop checkpoints every ``checkpoint_every`` steps and ``resume=True`` continues where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from chg_tlens import adapter, distributed
from chg_tlens.checkpoint import load_checkpoint, save_checkpoint
from chg_tlens.data import GateData
from chg_tlens.gates import HeadGates
from chg_tlens.objectives import (
    ClampMode,
    chg_loss,
    contrastive_loss,
    per_mask_grad_clip_,
    picked_accuracy,
    picked_logprobs,
    target_positions,
)
from chg_tlens.result import CHGResult, ContrastiveResult


@dataclass
class GateFitConfig:
    """Settings every gate fit shares."""

    n_seeds: int = 10
    """Independent gate sets (masks), each with its own uniform initial draw; trained in one pass."""
    batch_size: int = 64
    """Examples per update (each repeated once per seed inside the forward pass)."""
    steps: int = 500
    """Adam updates in each stage."""
    lam: float = 0.1
    """Regulariser strength (>= 0); the sign each stage uses is part of the method, not a setting."""
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
    checkpoint_every: int = 50
    """Steps between checkpoints when the fit is given a run folder."""
    autocast: Literal["bfloat16", "float16"] | None = None
    """Run the model's forward under torch.autocast in this dtype (GPU speed-up); None = model dtype."""
    bucket_window: int = 1
    """Length bucketing: sort windows of this many batches by length (1 = off). 8 cuts padding from
    ~35% to ~8% of tokens on mixed-length data; single-template tasks hardly need it."""

    def validate(self) -> GateFitConfig:
        """Reject impossible settings before any compute, naming the field."""
        name = type(self).__name__
        for key in ("n_seeds", "batch_size", "steps", "checkpoint_every", "bucket_window"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}.{key} must be a positive integer, got {value!r}.")
        for key in self._learning_rates():
            value = tuple(getattr(self, key)) if isinstance(getattr(self, key), (tuple, list)) else ()
            if len(value) != 2 or not all(_positive(v) for v in value):
                raise ValueError(
                    f"{name}.{key} must be two positive learning rates (start, end), "
                    f"got {getattr(self, key)!r}."
                )
        if not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"{name}.lam must be >= 0 (each stage applies its own sign), got {self.lam!r}.")
        for key in ("clamp", "grad_clip"):
            if not _positive(getattr(self, key)):
                raise ValueError(f"{name}.{key} must be positive, got {getattr(self, key)!r}.")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"{name}.autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}.")
        if self.clamp_mode not in ("one_sided", "two_sided"):
            raise ValueError(
                f"{name}.clamp_mode must be 'one_sided' or 'two_sided', got {self.clamp_mode!r}."
            )
        return self

    def _learning_rates(self) -> tuple[str, ...]:
        return ()


@dataclass
class CHGConfig(GateFitConfig):
    """Settings of a three-stage CHG fit; defaults are the paper's (Nam et al. 2025)."""

    lr_zero: tuple[float, float] = (0.1, 0.01)
    """Stage 1 (lambda = 0) learning rate, decaying linearly from the first to the second value."""
    lr_reg: tuple[float, float] = (0.5, 0.1)
    """G+ and G- learning rate, decaying linearly from the first to the second value."""

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

    def validate(self) -> ContrastiveConfig:
        super().validate()
        if not _positive(self.logprob_clamp):
            raise ValueError(f"ContrastiveConfig.logprob_clamp must be positive, got {self.logprob_clamp!r}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"ContrastiveConfig.threshold must be within [0, 1], got {self.threshold!r}.")
        return self

    def _learning_rates(self) -> tuple[str, ...]:
        return ("lr",)


# ----------------------------------------------------------------------------------- CHG
def fit_chg(
    model: Any,
    data: GateData,
    config: CHGConfig | None = None,
    init_theta: Float[Tensor, "seed layer head"] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> CHGResult:
    """Fit G0, then G+ and G- from it, for ``config.n_seeds`` seeds at once; return the roles.

    ``init_theta`` replaces the uniform initial draw (a warm start, or a planted starting point).
    ``run_dir`` turns on checkpoints there; ``resume=True`` continues from its checkpoint.
    """
    config = (config or CHGConfig()).validate()
    stages = [
        Stage("zero", "init", config.lr_zero, chg_objective(0.0, config)),
        Stage("plus", "zero", config.lr_reg, chg_objective(+config.lam, config)),
        Stage("minus", "zero", config.lr_reg, chg_objective(-config.lam, config)),
    ]
    fitted, logs, seconds = run_stages(model, data, config, stages, "chg", init_theta, run_dir, resume)
    return CHGResult(
        theta_zero=fitted["zero"],
        theta_plus=fitted["plus"],
        theta_minus=fitted["minus"],
        losses=logs,
        config=config_record(config),
        provenance=provenance(model, data, seconds),
    )


def chg_objective(lam: float, config: GateFitConfig) -> Objective:
    """Eq. 1 with the stage's lambda: target NLL minus the clamped reward for open (or closed) gates."""

    def objective(model: Any, gates: HeadGates, batch: GateData) -> tuple[Tensor, Tensor]:
        device = gates.theta.device
        tokens, target_mask = batch.tokens.to(device), batch.target_mask.to(device)
        picked = gated_target_logits(model, gates, tokens, target_mask)
        nll = -picked_logprobs(picked, tokens, target_mask).mean(dim=1)
        return chg_loss(nll, gates.theta, lam, config.clamp, config.clamp_mode), nll

    return objective


# ----------------------------------------------------------------------------------- contrastive
def fit_contrastive_chg(
    model: Any,
    data: GateData,
    config: ContrastiveConfig | None = None,
    eval_data: GateData | None = None,
    init_theta: Float[Tensor, "seed layer head"] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> ContrastiveResult:
    """One gate set per seed that keeps the retain version of a task and destroys the forget version.

    ``data`` is the retain side with its matched forget side attached (``GateData.contrastive``).
    Accuracy and log-prob before and after gating are measured on ``eval_data`` (held-out items) when
    given, else on ``data``.
    """
    config = (config or ContrastiveConfig()).validate()
    for name, value in (("data", data), ("eval_data", eval_data)):
        if value is not None and (not isinstance(value, GateData) or value.forget is None):
            raise ValueError(
                f"{name}: contrastive CHG needs matched retain/forget items; build it with "
                "GateData.contrastive(retain=..., forget=...)."
            )
    stages = [Stage("contrastive", "init", config.lr, contrastive_objective(config))]
    fitted, logs, seconds = run_stages(model, data, config, stages, "contrastive", init_theta, run_dir,
                                       resume)
    theta = fitted["contrastive"]
    evaluation = eval_data if eval_data is not None else data
    device = torch.device(config.device) if config.device else adapter.model_device(model)
    ones = HeadGates.fixed(torch.ones(1, theta.shape[1], theta.shape[2])).to(device)
    gated = HeadGates.fixed(torch.sigmoid(theta)).to(device)
    metrics = {}
    for side, side_data in (("retain", evaluation), ("forget", evaluation.forget)):
        for when, gates in (("before", ones), ("after", gated)):
            logprob, accuracy = score_gates(model, side_data, gates, config.batch_size)
            metrics[f"{side}_{when}_logprob"] = logprob.mean(dim=1)
            metrics[f"{side}_{when}_accuracy"] = accuracy.mean(dim=1)
    return ContrastiveResult(
        theta=theta, losses=logs, metrics=metrics, config=config_record(config),
        provenance=provenance(model, data, seconds) | {"evaluated_on": "eval_data" if eval_data else "data"},
    )


def contrastive_objective(config: ContrastiveConfig) -> Objective:
    """Retain NLL + clamped (forget - stopgrad retain) log-prob gap - lam * clamped gate reward."""

    def objective(model: Any, gates: HeadGates, batch: GateData) -> tuple[Tensor, Tensor]:
        device = gates.theta.device
        both = GateData.stack_padded([batch, batch.forget])
        tokens, target_mask = both.tokens.to(device), both.target_mask.to(device)
        logprob = picked_logprobs(gated_target_logits(model, gates, tokens, target_mask), tokens, target_mask)
        retain, forget = logprob[:, : len(batch)], logprob[:, len(batch) :]
        loss = contrastive_loss(retain, forget, gates.theta, config.lam, config.clamp,
                                config.logprob_clamp, config.clamp_mode)
        return loss, -retain.mean(dim=1)

    return objective


# ----------------------------------------------------------------------------------- the loop
Objective = Callable[[Any, HeadGates, GateData], tuple[Tensor, Tensor]]
"""(model, gates, batch) -> (loss per mask, task NLL per mask)."""


@dataclass
class Stage:
    """One Adam run on the gate logits: its name, where it starts, its learning rates and loss."""

    name: str
    start_from: str
    lr: tuple[float, float]
    objective: Objective


@dataclass
class StageLog:
    """Per-step curves of one stage, ``[step, seed]``."""

    loss: list[Tensor] = field(default_factory=list)
    nll: list[Tensor] = field(default_factory=list)

    def as_tensors(self) -> dict[str, Tensor]:
        return {"loss": torch.stack(self.loss), "nll": torch.stack(self.nll)}


def run_stages(
    model: Any,
    data: GateData,
    config: GateFitConfig,
    stages: list[Stage],
    kind: str,
    init_theta: Tensor | None,
    run_dir: str | Path | None,
    resume: bool,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], float]:
    """Check everything, then run the stages in order with checkpoints; return thetas and curves."""
    layout = adapter.require_model(model)
    if not isinstance(data, GateData):
        raise TypeError(f"data: expected a chg_tlens.GateData, got {type(data).__name__}.")
    data.checked_for(model)
    shape = [config.n_seeds, layout.n_layers, layout.n_heads]
    if init_theta is not None and list(init_theta.shape) != shape:
        raise ValueError(f"init_theta must have shape [seed, layer, head] = {shape}, "
                         f"got {list(init_theta.shape)}.")
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir of the interrupted fit.")
    folder = Path(run_dir) if run_dir is not None else None
    record, fingerprint = config_record(config), data.fingerprint()
    state: dict[str, Any] = {"kind": kind, "config": record, "data_fingerprint": fingerprint,
                             "stage": stages[0].name, "step": 0, "finished": {}, "logs": {},
                             "theta": None, "optimizer": None, "seconds": 0.0}
    if resume:
        state = load_checkpoint(folder, kind, record, fingerprint)
        torch.set_rng_state(state["rng"])
    if init_theta is None:
        init_theta = HeadGates(layout.n_layers, layout.n_heads, config.n_seeds, config.seed).theta.detach()
    device = torch.device(config.device) if config.device else adapter.model_device(model)
    started = time.time() - state["seconds"]

    with adapter.frozen(model):
        for stage in stages:
            if stage.name in state["finished"]:
                continue
            resuming_this = state["stage"] == stage.name and state["theta"] is not None
            if resuming_this:
                theta = state["theta"]
            else:
                theta = init_theta if stage.start_from == "init" else state["finished"][stage.start_from]
                state.update(stage=stage.name, step=0, optimizer=None)
                state["logs"][stage.name] = {"loss": [], "nll": []}
            gates = HeadGates(layout.n_layers, layout.n_heads, config.n_seeds, theta=theta).to(device)
            _train_stage(model, gates, data, stage, config, state, folder, started)
            state["finished"][stage.name] = gates.theta.detach().cpu().clone()
            state.update(theta=None, optimizer=None)
            if folder is not None:
                _save(folder, state, started)

    logs = {name: {k: torch.stack(v) for k, v in curves.items()} for name, curves in state["logs"].items()}
    return state["finished"], logs, time.time() - started


def _train_stage(model: Any, gates: HeadGates, data: GateData, stage: Stage, config: GateFitConfig,
                 state: dict[str, Any], folder: Path | None, started: float) -> None:
    optimizer = torch.optim.Adam([gates.theta], lr=stage.lr[0])
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    log = state["logs"][stage.name]
    salt = _STAGE_SALT.get(stage.name, 0)
    first = state["step"]
    for step in tqdm(range(first, config.steps), desc=f"CHG {stage.name}", disable=not config.progress,
                     leave=False, initial=first, total=config.steps):
        if folder is not None and step > first and step % config.checkpoint_every == 0:
            _save(folder, _snapshot(state, stage, step, gates, optimizer), started)
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(stage.lr, step, config.steps)
        index = data.batch_indices(step, config.batch_size, seed=config.seed * 1009 + salt,
                                   bucket_window=config.bucket_window)
        with _autocast(config.autocast, gates.theta.device):
            loss, nll = stage.objective(model, gates, data.subset(distributed.local_slice(index)))
        seen_loss = distributed.average_(loss.detach().clone())
        if not torch.isfinite(seen_loss).all():
            if folder is not None:
                _save(folder, _snapshot(state, stage, step, gates, optimizer), started)
            bad = torch.nonzero(~torch.isfinite(seen_loss)).flatten().tolist()
            raise FloatingPointError(
                f"CHG stage '{stage.name}', step {step}: the loss is not finite for seed(s) {bad} "
                f"(values {seen_loss.cpu().tolist()}) on the batch of example indices "
                f"{index.tolist()}. Check the data and the model's dtype."
                + (f" The last good state is checkpointed in {folder}." if folder is not None else "")
            )
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        distributed.average_(gates.theta.grad)
        per_mask_grad_clip_(gates.theta.grad, config.grad_clip)
        optimizer.step()
        log["loss"].append(seen_loss.cpu())
        log["nll"].append(distributed.average_(nll.detach().clone()).cpu())


def _snapshot(state: dict[str, Any], stage: Stage, step: int, gates: HeadGates,
              optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state.update(stage=stage.name, step=step, theta=gates.theta.detach().cpu().clone(),
                 optimizer=optimizer.state_dict())
    return state


def _save(folder: Path, state: dict[str, Any], started: float) -> None:
    state["seconds"] = time.time() - started
    state["rng"] = torch.get_rng_state()
    if distributed.is_main_process():
        save_checkpoint(folder, state)


def _autocast(dtype: str | None, device: torch.device) -> Any:
    """Mixed precision for the frozen model's forward (bf16/fp16 on GPU); gates and loss stay fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------------- helpers
def gated_logits(
    model: Any, gates: HeadGates, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "mask_batch pos vocab"]:
    """Logits of the batch repeated once per mask, each replica under its own gates."""
    with model.hooks(fwd_hooks=gates.hooks()):
        return model(gates.repeat_batch(tokens))


def gated_target_logits(
    model: Any, gates: HeadGates, tokens: Int[Tensor, "batch pos"], target_mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "mask target vocab"]:
    """Only the logits that predict target tokens, per mask: the loss needs nothing else."""
    example, position = target_positions(target_mask)
    replica = torch.arange(gates.n_masks, device=tokens.device)[:, None] * tokens.shape[0]
    rows = (replica + example[None, :]).flatten()
    logits = adapter.logits_at(model, gates.repeat_batch(tokens), rows, position.repeat(gates.n_masks),
                               gates.hooks())
    return logits.reshape(gates.n_masks, len(example), logits.shape[-1])


@torch.no_grad()
def score_gates(
    model: Any, data: GateData, gates: HeadGates, batch_size: int = 32
) -> tuple[Float[Tensor, "mask example"], Float[Tensor, "mask example"]]:
    """Mean target log-prob and top-1 accuracy of every example under each mask's gates."""
    device = gates.theta.device
    logprobs, accuracies = [], []
    for start in range(0, len(data), batch_size):
        batch = data.subset(slice(start, start + batch_size))
        tokens, target_mask = batch.tokens.to(device), batch.target_mask.to(device)
        picked = gated_target_logits(model, gates, tokens, target_mask)
        logprobs.append(picked_logprobs(picked, tokens, target_mask).cpu())
        accuracies.append(picked_accuracy(picked, tokens, target_mask).cpu())
    return torch.cat(logprobs, dim=1), torch.cat(accuracies, dim=1)


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


_STAGE_SALT = {"zero": 1, "plus": 2, "minus": 3, "contrastive": 4}


def _positive(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)
