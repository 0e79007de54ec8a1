"""Fitting gates: the three CHG stages (all seeds in one pass), and contrastive CHG.

    theta_zero  = fit(lambda = 0)                      # shared starting point
    theta_plus  = fit(lambda = +lam, from theta_zero)  # G+: opening rewarded
    theta_minus = fit(lambda = -lam, from theta_zero)  # G-: closing rewarded

Each stage is Adam on the gate logits with a linearly decaying learning rate. With a ``run_dir`` the
loop checkpoints every ``checkpoint_every`` steps and ``resume=True`` continues where it stopped.
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

from chg_tlens.core import checks, distributed
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
            raise InputError(
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
        first = data.subset(slice(0, config.batch_size))
        check_target_logits(model, HeadGates.fixed(torch.sigmoid(init_theta[:1])).to(device),
                            first.tokens.to(device), first.target_mask.to(device), force=True)
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
def linear_lr(lr: tuple[float, float], step: int, steps: int) -> float:
    """Linear decay from ``lr[0]`` at the first step to ``lr[1]`` at the last."""
    if steps <= 1:
        return float(lr[0])
    return float(lr[0] + (lr[1] - lr[0]) * step / (steps - 1))


_STAGE_SALT = {"zero": 1, "plus": 2, "minus": 3, "contrastive": 4}

