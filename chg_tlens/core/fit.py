"""Fitting gates: the three CHG stages (all seeds in one pass), and contrastive CHG.

    theta_zero  = fit(lambda = 0)                      # shared starting point
    theta_plus  = fit(lambda = +lam, from theta_zero)  # G+: opening rewarded
    theta_minus = fit(lambda = -lam, from theta_zero)  # G-: closing rewarded

Each stage is Adam on the gate logits with a linearly decaying learning rate. G+ and G- start from
the same gates and see the same batches, so by default they run as one stage of 2 x n_seeds masks
(masks carry their own lambda sign): the same arithmetic at half the forward passes. Every stage
keeps a trace of its gates for the convergence report and may stop early once its heads settle.
With a ``run_dir`` the loop checkpoints every ``checkpoint_every`` steps and ``resume=True``
continues where it stopped, early stops included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from chg_tlens.core import checks, convergence, distributed
from chg_tlens.core.checkpoint import load_checkpoint, save_checkpoint
from chg_tlens.core.config import CHGConfig, ContrastiveConfig, GateFitConfig, config_record
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import check_target_logits, gated_target_logits, score_gates
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.objectives import chg_loss, contrastive_loss, per_mask_grad_clip_, picked_logprobs
from chg_tlens.core.provenance import provenance
from chg_tlens.core.result import CHGResult, ContrastiveResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter


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
    lam = config.lam
    stages = [Stage("zero", "init", config.lr_zero, chg_objective([0.0], config))]
    if config.fuse_regularised:
        stages.append(Stage("regularised", "zero", config.lr_reg, chg_objective([+lam, -lam], config),
                            outputs=("plus", "minus"), salt=_REGULARISED_SALT))
    else:
        stages += [Stage(name, "zero", config.lr_reg, chg_objective([sign * lam], config),
                         salt=_REGULARISED_SALT) for name, sign in (("plus", +1), ("minus", -1))]
    fit = run_stages(model, data, config, stages, "chg", init_theta, run_dir, resume)
    return CHGResult(
        theta_zero=fit.theta["zero"],
        theta_plus=fit.theta["plus"],
        theta_minus=fit.theta["minus"],
        losses=fit.losses,
        config=config_record(config),
        provenance=provenance(model, data, fit.seconds),
        trace=fit.trace,
    )


def chg_objective(lams: list[float], config: GateFitConfig) -> Objective:
    """Eq. 1: target NLL minus the clamped reward for open (lambda > 0) or closed (< 0) gates.

    ``lams`` splits the masks into equal consecutive groups, one lambda each: ``[0]`` for stage 1,
    ``[+lam, -lam]`` for the fused G+/G- stage (seeds' G+ masks first, then their G- masks).
    """

    def objective(model: Any, gates: HeadGates, batch: GateData) -> tuple[Tensor, Tensor]:
        device = gates.theta.device
        tokens, target_mask = batch.tokens.to(device), batch.target_mask.to(device)
        targets = batch.targets_to(device)
        picked = gated_target_logits(model, gates, tokens, target_mask, targets)
        nll = -picked_logprobs(picked, tokens, target_mask, targets).mean(dim=1)
        groups = zip(nll.chunk(len(lams)), gates.theta.chunk(len(lams)), lams, strict=True)
        loss = torch.cat([chg_loss(part, theta, lam, config.clamp, config.clamp_mode)
                          for part, theta, lam in groups])
        return loss, nll

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
            raise InputError(
                f"{name}: contrastive CHG needs matched retain/forget items; build it with "
                "GateData.contrastive(retain=..., forget=...)."
            )
    stages = [Stage("contrastive", "init", config.lr, contrastive_objective(config), salt=4)]
    fit = run_stages(model, data, config, stages, "contrastive", init_theta, run_dir, resume)
    theta = fit.theta["contrastive"]
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
        theta=theta, losses=fit.losses, metrics=metrics, config=config_record(config),
        provenance=provenance(model, data, fit.seconds)
        | {"evaluated_on": "eval_data" if eval_data else "data"},
        trace=fit.trace,
    )


def contrastive_objective(config: ContrastiveConfig) -> Objective:
    """Retain NLL + clamped (forget - stopgrad retain) log-prob gap - lam * clamped gate reward."""

    def objective(model: Any, gates: HeadGates, batch: GateData) -> tuple[Tensor, Tensor]:
        device = gates.theta.device
        both = GateData.stack_padded([batch, batch.forget])
        tokens, target_mask = both.tokens.to(device), both.target_mask.to(device)
        targets = both.targets_to(device)
        picked = gated_target_logits(model, gates, tokens, target_mask, targets)
        logprob = picked_logprobs(picked, tokens, target_mask, targets)
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
    """One Adam run on the gate logits: its name, where it starts, its learning rates and loss.

    ``outputs`` names the gate sets its masks hold, in order: a stage of several outputs starts each
    from a copy of ``start_from`` (the fused G+/G- stage). ``salt`` picks its batch order; stages with
    the same salt see the same batches.
    """

    name: str
    start_from: str
    lr: tuple[float, float]
    objective: Objective
    outputs: tuple[str, ...] = ()
    salt: int = 1

    def __post_init__(self) -> None:
        self.outputs = self.outputs or (self.name,)


@dataclass
class StagesFit:
    """What :func:`run_stages` returns: per output, the gate logits, loss curves and gate trace."""

    theta: dict[str, Tensor]
    losses: dict[str, dict[str, Tensor]]
    trace: dict[str, dict[str, Tensor]]
    seconds: float


def run_stages(
    model: Any,
    data: GateData,
    config: GateFitConfig,
    stages: list[Stage],
    kind: str,
    init_theta: Tensor | None,
    run_dir: str | Path | None,
    resume: bool,
) -> StagesFit:
    """Check everything, then run the stages in order with checkpoints."""
    layout = adapter.require_model(model)
    checks.gate_data(data, model)
    shape = [config.n_seeds, layout.n_layers, layout.n_heads]
    if init_theta is not None and list(init_theta.shape) != shape:
        raise InputError(f"init_theta must have shape [seed, layer, head] = {shape}, "
                         f"got {list(init_theta.shape)}.")
    if resume and run_dir is None:
        raise InputError("resume=True needs the run_dir of the interrupted fit.")
    folder = Path(run_dir) if run_dir is not None else None
    record, fingerprint = config_record(config), data.fingerprint()
    state: dict[str, Any] = {"kind": kind, "config": record, "data_fingerprint": fingerprint,
                             "stage": stages[0].name, "step": 0, "finished": {}, "logs": {}, "trace": {},
                             "theta": None, "optimizer": None, "seconds": 0.0}
    if resume:
        state = load_checkpoint(folder, kind, record, fingerprint)
        torch.set_rng_state(state["rng"])
    if init_theta is None:
        init_theta = HeadGates(layout.n_layers, layout.n_heads, config.n_seeds, config.seed).theta.detach()
    device = torch.device(config.device) if config.device else adapter.model_device(model)
    started = time.time() - state["seconds"]

    with adapter.frozen(model):
        first = data.subset(slice(0, config.batch_size))
        check_target_logits(model, HeadGates.fixed(torch.sigmoid(init_theta[:1])).to(device),
                            first.tokens.to(device), first.target_mask.to(device), force=True,
                            targets=first.targets_to(device))
        for stage in stages:
            if all(name in state["finished"] for name in stage.outputs):
                continue
            if state["stage"] == stage.name and state["theta"] is not None:
                theta = state["theta"]
            else:
                start = init_theta if stage.start_from == "init" else state["finished"][stage.start_from]
                theta = start.repeat(len(stage.outputs), 1, 1)
                state.update(stage=stage.name, step=0, optimizer=None)
                state["logs"][stage.name] = {"loss": [], "nll": []}
                state["trace"][stage.name] = {"steps": [0], "gates": [torch.sigmoid(theta).clone()],
                                              "stopped_at": -1}
            gates = HeadGates(layout.n_layers, layout.n_heads, theta.shape[0], theta=theta).to(device)
            _train_stage(model, gates, data, stage, config, state, folder, started)
            for name, part in zip(stage.outputs, gates.theta.detach().cpu().chunk(len(stage.outputs)),
                                  strict=True):
                state["finished"][name] = part.clone()
            state.update(theta=None, optimizer=None)
            if folder is not None:
                _save(folder, state, started)
    return _split_outputs(stages, state, time.time() - started)


def _split_outputs(stages: list[Stage], state: dict[str, Any], seconds: float) -> StagesFit:
    """Curves and traces per output gate set (a fused stage's masks split back into G+ and G-)."""
    losses: dict[str, dict[str, Tensor]] = {}
    trace: dict[str, dict[str, Tensor]] = {}
    for stage in stages:
        n = len(stage.outputs)
        curves = {k: torch.stack(v) for k, v in state["logs"][stage.name].items()}
        record = state["trace"][stage.name]
        gates = torch.stack(record["gates"])
        for i, name in enumerate(stage.outputs):
            losses[name] = {k: v.chunk(n, dim=1)[i] for k, v in curves.items()}
            trace[name] = {"steps": torch.tensor(record["steps"]), "gates": gates.chunk(n, dim=1)[i],
                           "stopped_at": torch.tensor(record["stopped_at"])}
    return StagesFit(state["finished"], losses, trace, seconds)


def _train_stage(model: Any, gates: HeadGates, data: GateData, stage: Stage, config: GateFitConfig,
                 state: dict[str, Any], folder: Path | None, started: float) -> None:
    optimizer = torch.optim.Adam([gates.theta], lr=stage.lr[0])
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    log, trace = state["logs"][stage.name], state["trace"][stage.name]
    first = state["step"]
    for step in tqdm(range(first, config.steps), desc=f"CHG {stage.name}", disable=not config.progress,
                     leave=False, initial=first, total=config.steps):
        if folder is not None and step > first and step % config.checkpoint_every == 0:
            _save(folder, _snapshot(state, stage, step, gates, optimizer), started)
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(stage.lr, step, config.steps)
        index = data.batch_indices(step, config.batch_size, seed=config.seed * 1009 + stage.salt,
                                   bucket_window=config.bucket_window)
        with _autocast(config.autocast, gates.theta.device):
            loss, nll = stage.objective(model, gates, data.subset(distributed.local_slice(index)))
        seen_loss = distributed.average_(loss.detach().clone())
        if not torch.isfinite(seen_loss).all():
            if folder is not None:
                _save(folder, _snapshot(state, stage, step, gates, optimizer), started)
            bad = torch.nonzero(~torch.isfinite(seen_loss)).flatten().tolist()
            raise FloatingPointError(
                f"CHG stage '{stage.name}', step {step}: the loss is not finite for mask(s) {bad} "
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
        done = step + 1
        if done % config.trace_every == 0 or done == config.steps:
            trace["steps"].append(done)
            trace["gates"].append(gates.values().detach().cpu().clone())
            if config.early_stop and _settled(trace, len(stage.outputs) == 2, config):
                trace["stopped_at"] = done
                break


def _settled(trace: dict[str, Any], paired: bool, config: GateFitConfig) -> bool:
    """The early-stopping rule on the trace so far (the same rule on every process and on resume)."""
    steps, gates = torch.tensor(trace["steps"]), torch.stack(trace["gates"])
    codes = convergence.states(gates, paired, config.role_threshold)
    return convergence.stable_over(steps, gates, codes, config.patience, config.stop_tolerance)


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
def linear_lr(lr: tuple[float, float], step: int, steps: int) -> float:
    """Linear decay from ``lr[0]`` at the first step to ``lr[1]`` at the last."""
    if steps <= 1:
        return float(lr[0])
    return float(lr[0] + (lr[1] - lr[0]) * step / (steps - 1))


_REGULARISED_SALT = 2
"""G+ and G- (fused or not) see the same batches, so the two forms of the fit give the same gates."""

