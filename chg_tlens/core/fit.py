"""Fitting gates: the three CHG stages (all seeds in one pass), and contrastive CHG.

    theta_zero  = fit(lambda = 0)                      # shared starting point
    theta_plus  = fit(lambda = +lam, from theta_zero)  # G+: opening rewarded
    theta_minus = fit(lambda = -lam, from theta_zero)  # G-: closing rewarded

Two optimisers run a stage. ``adam`` is the paper's: minibatch Adam on the gate logits with a linearly
decaying learning rate. ``lbfgs`` minimises each mask's full-data objective by L-BFGS with a
backtracking line search per mask (:mod:`chg_tlens.core.lbfgs`): deterministic, no learning rate, and
it stops a mask once its gradient is small enough to certify (:mod:`chg_tlens.core.certificate`).
Either way the data term of an update may be accumulated over micro-batches (``micro_batch_size``), so
the number of examples per update is free of memory.

G+ and G- start from the same gates and see the same batches, so by default they run as one stage of
2 x n_seeds masks (each mask carries its own lambda): the same arithmetic at half the forward passes.
Every stage keeps a trace of its gates and its final full-data gradient for the certificate, and may
stop once certified. With a ``run_dir`` the loop checkpoints every ``checkpoint_every`` updates and
``resume=True`` continues where it stopped, early stops included.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from chg_tlens.core import certificate, checks, convergence, distributed, lbfgs
from chg_tlens.core.checkpoint import load_checkpoint, save_checkpoint
from chg_tlens.core.config import CHGConfig, ContrastiveConfig, GateFitConfig, config_record
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import check_target_logits, gated_target_logits, score_gates
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.objectives import (
    answer_contrast,
    chg_loss,
    contrastive_data_term,
    per_mask_grad_clip_,
    picked_logprobs,
)
from chg_tlens.core.provenance import provenance
from chg_tlens.core.result import CHGResult, ContrastiveResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel


# ----------------------------------------------------------------------------------- CHG
def fit_chg(
    model: TransformerLensModel,
    data: GateData,
    config: CHGConfig | None = None,
    init_theta: Float[Tensor, "seed layer head"] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    example_weights: Float[Tensor, "seed example"] | None = None,
) -> CHGResult:
    """Fit G0, then G+ and G- from it, for ``config.n_seeds`` seeds at once; return the roles.

    ``init_theta`` replaces the uniform initial draw (a warm start, or a planted starting point).
    ``run_dir`` turns on checkpoints there; ``resume=True`` continues from its checkpoint.
    ``example_weights`` gives each seed its own weighting of the examples (e.g. bootstrap counts from
    :func:`bootstrap_weights`, so seeds differ by their sample of prompts); None weighs all alike.
    """
    config = (config or CHGConfig()).validate()
    lam = config.lam
    objective = nll_objective
    if config.objective == "contrast":
        objective = contrast_objective
        require_contrast_twin(checks.gate_data(data, model))
    # both data terms are cross-entropies: stage 1 (lambda = 0) is certified at 0 if it fits the prompts
    stages = [Stage("zero", "init", config.lr_zero, objective, lams=(0.0,), loss_floor=0.0)]
    if config.fuse_regularised:
        stages.append(Stage("regularised", "zero", config.lr_reg, objective, lams=(+lam, -lam),
                            outputs=("plus", "minus"), salt=_REGULARISED_SALT))
    else:
        stages += [Stage(name, "zero", config.lr_reg, objective, lams=(sign * lam,),
                         salt=_REGULARISED_SALT) for name, sign in (("plus", +1), ("minus", -1))]
    fit = run_stages(model, data, config, stages, "chg", init_theta, run_dir, resume, example_weights)
    return CHGResult(
        theta_zero=fit.theta["zero"],
        theta_plus=fit.theta["plus"],
        theta_minus=fit.theta["minus"],
        losses=fit.losses,
        config=config_record(config),
        provenance=provenance(model, data, fit.seconds),
        trace=fit.trace,
    )


def bootstrap_weights(n_examples: int, n_resamples: int, seed: int = 0) -> Float[Tensor, "resample example"]:
    """Bootstrap resamples as example weights: how often each example is drawn in each of ``n_resamples``
    draws of ``n_examples`` with replacement (reproducible by ``seed``)."""
    checks.positive_int(n_examples, "n_examples")
    checks.positive_int(n_resamples, "n_resamples")
    generator = torch.Generator().manual_seed(seed * 7_919 + 17)
    draws = torch.randint(0, n_examples, (n_resamples, n_examples), generator=generator)
    return torch.zeros(n_resamples, n_examples).scatter_add_(1, draws, torch.ones(n_resamples, n_examples))


def nll_objective(model: TransformerLensModel, gates: HeadGates, batch: GateData) -> tuple[Tensor, Tensor]:
    """Eq. 1's data term: each example's target NLL under each mask's gates (twice: it is also the NLL)."""
    device = gates.theta.device
    tokens, target_mask = batch.tokens.to(device), batch.target_mask.to(device)
    targets = batch.targets_to(device)
    picked = gated_target_logits(model, gates, tokens, target_mask, targets)
    nll = -picked_logprobs(picked, tokens, target_mask, targets)
    return nll, nll


def contrast_objective(model: TransformerLensModel, gates: HeadGates, batch: GateData
                       ) -> tuple[Tensor, Tensor]:
    """``CHGConfig(objective="contrast")``'s data term: each example's answer-vs-corrupt-answer
    cross-entropy (:func:`~chg_tlens.core.objectives.answer_contrast`), and its target NLL for the logs."""
    device = gates.theta.device
    tokens, target_mask = batch.tokens.to(device), batch.target_mask.to(device)
    targets = batch.targets_to(device)
    picked = gated_target_logits(model, gates, tokens, target_mask, targets)
    term = answer_contrast(picked, tokens, target_mask, batch.corrupt.labels().to(device), targets)
    return term, -picked_logprobs(picked, tokens, target_mask, targets)


def require_contrast_twin(data: GateData) -> None:
    """The contrast objective reads the corrupt twin's answer at each clean target: a twin with the same
    target positions and scoring mode, whose answers differ from the clean ones."""
    twin = checks.corrupt_twin(data, "CHGConfig(objective='contrast')")
    if not torch.equal(twin.target_mask, data.target_mask) or twin.per_position != data.per_position:
        raise InputError("CHGConfig(objective='contrast'): the corrupt twin must score the same target "
                         "positions in the same mode as the clean data (its answers are read there).")
    same = twin.labels() == data.labels()
    if bool(same.all()):
        raise InputError("CHGConfig(objective='contrast'): every corrupt answer equals its clean answer, so "
                         "there is no contrast to fit; use a twin whose answer differs (or objective='nll').")


# ----------------------------------------------------------------------------------- contrastive
def fit_contrastive_chg(
    model: TransformerLensModel,
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
    stages = [Stage("contrastive", "init", config.lr, contrastive_objective(config), lams=(config.lam,),
                    salt=4)]
    fit = run_stages(model, data, config, stages, "contrastive", init_theta, run_dir, resume)
    theta = fit.theta["contrastive"]
    evaluation = eval_data if eval_data is not None else data
    device = torch.device(config.device) if config.device else adapter.model_device(model)
    ones = HeadGates.fixed(torch.ones(1, theta.shape[1], theta.shape[2])).to(device)
    gated = HeadGates.fixed(torch.sigmoid(theta)).to(device)
    metrics = {}
    batch_size = config.micro_batch_size or config.batch_size
    for side, side_data in (("retain", evaluation), ("forget", evaluation.forget)):
        for when, gates in (("before", ones), ("after", gated)):
            logprob, accuracy = score_gates(model, side_data, gates, batch_size)
            metrics[f"{side}_{when}_logprob"] = logprob.mean(dim=1)
            metrics[f"{side}_{when}_accuracy"] = accuracy.mean(dim=1)
    return ContrastiveResult(
        theta=theta, losses=fit.losses, metrics=metrics, config=config_record(config),
        provenance=provenance(model, data, fit.seconds)
        | {"evaluated_on": "eval_data" if eval_data else "data"},
        trace=fit.trace,
    )


def contrastive_objective(config: ContrastiveConfig) -> Objective:
    """Per example: retain NLL + the (forget - stopgrad retain) log-prob gap, clamped at
    ``-logprob_clamp`` so a forget item already far below its retain twin stops pulling."""

    def objective(model: TransformerLensModel, gates: HeadGates, batch: GateData) -> tuple[Tensor, Tensor]:
        device = gates.theta.device
        both = GateData.stack_padded([batch, batch.forget])
        tokens, target_mask = both.tokens.to(device), both.target_mask.to(device)
        targets = both.targets_to(device)
        picked = gated_target_logits(model, gates, tokens, target_mask, targets)
        logprob = picked_logprobs(picked, tokens, target_mask, targets)
        retain, forget = logprob[:, : len(batch)], logprob[:, len(batch) :]
        return contrastive_data_term(retain, forget, config.logprob_clamp), -retain

    return objective


# ----------------------------------------------------------------------------------- the loop
Objective = Callable[[TransformerLensModel, HeadGates, GateData], tuple[Tensor, Tensor]]
"""(model, gates, batch) -> (data term per mask and example, task NLL per mask and example); the
regulariser is added per mask by the loop, so its gradient is known apart from the data's."""


@dataclass
class Stage:
    """One optimiser run on the gate logits: its name, where it starts, its learning rates, its data
    term, and the lambda of each gate set it holds.

    ``outputs`` names the gate sets its masks hold, in order: a stage of several outputs starts each
    from a copy of ``start_from`` (the fused G+/G- stage), and ``lams[i]`` is output ``i``'s lambda.
    ``salt`` picks its batch order; stages with the same salt see the same batches. ``loss_floor`` is
    the objective's lower bound where one is known (the certificate's test at the bound), else None.
    """

    name: str
    start_from: str
    lr: tuple[float, float]
    objective: Objective
    lams: tuple[float, ...] = (0.0,)
    outputs: tuple[str, ...] = ()
    salt: int = 1
    loss_floor: float | None = None

    def __post_init__(self) -> None:
        self.outputs = self.outputs or (self.name,)
        if len(self.lams) != len(self.outputs):
            raise ValueError(f"stage {self.name}: one lambda per output, got {self.lams} for {self.outputs}")

    def mask_lams(self, n_seeds: int) -> Tensor:
        """Lambda of every mask: the outputs' masks in order, ``n_seeds`` each."""
        return torch.tensor(self.lams, dtype=torch.float32).repeat_interleave(n_seeds)


@dataclass
class StagesFit:
    """What :func:`run_stages` returns: per output, the gate logits, loss curves and gate trace."""

    theta: dict[str, Tensor]
    losses: dict[str, dict[str, Tensor]]
    trace: dict[str, dict[str, Tensor]]
    seconds: float


def run_stages(
    model: TransformerLensModel,
    data: GateData,
    config: GateFitConfig,
    stages: list[Stage],
    kind: str,
    init_theta: Tensor | None,
    run_dir: str | Path | None,
    resume: bool,
    example_weights: Tensor | None = None,
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
    example_weights = checks.example_weights(example_weights, config.n_seeds, len(data))
    record, fingerprint = config_record(config), data.fingerprint()
    if example_weights is not None:  # part of what a checkpoint must match
        record["example_weights_sha256"] = hashlib.sha256(example_weights.numpy().tobytes()).hexdigest()
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
        first = data.subset(slice(0, min(config.batch_size, config.micro_batch_size or config.batch_size)))
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
                theta = start.detach().cpu().float().repeat(len(stage.outputs), 1, 1)
                state.update(stage=stage.name, step=0, optimizer=None)
                state["logs"][stage.name] = {"loss": [], "nll": []}
                state["trace"][stage.name] = {"steps": [0], "gates": [torch.sigmoid(theta).clone()],
                                              "stopped_at": -1, "passes": torch.zeros(theta.shape[0]),
                                              "settled_at": torch.full((theta.shape[0],), -1),
                                              "lams": stage.mask_lams(config.n_seeds)}
                if stage.loss_floor is not None:
                    state["trace"][stage.name]["loss_floor"] = torch.full((theta.shape[0],), stage.loss_floor)
            run = StageRun(model, data, stage, config, state, folder, started, device,
                           layout.n_layers * layout.n_heads, example_weights)
            theta = run.lbfgs(theta) if config.optimizer == "lbfgs" else run.adam(theta)
            for name, part in zip(stage.outputs, theta.chunk(len(stage.outputs)), strict=True):
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
        per_mask = {key: record[key] for key in ("passes", "lams", "task_grad", "theta", "settled_at",
                                                 "full_loss", "loss_floor") if key in record}
        for i, name in enumerate(stage.outputs):
            losses[name] = {k: v.chunk(n, dim=1)[i] for k, v in curves.items()}
            trace[name] = {"steps": torch.tensor(record["steps"]), "gates": gates.chunk(n, dim=1)[i],
                           "stopped_at": torch.tensor(record["stopped_at"])} | {
                key: value.chunk(n)[i].clone() for key, value in per_mask.items()}
    return StagesFit(state["finished"], losses, trace, seconds)


class StageRun:
    """One stage of one fit: evaluates its objective on the data and runs Adam or L-BFGS on it."""

    def __init__(self, model: TransformerLensModel, data: GateData, stage: Stage, config: GateFitConfig,
                 state: dict[str, Any], folder: Path | None, started: float, device: torch.device,
                 n_gates: int, weights: Tensor | None = None) -> None:
        self.model, self.data, self.stage, self.config = model, data, stage, config
        self.state, self.folder, self.started, self.device = state, folder, started, device
        self.lams = stage.mask_lams(config.n_seeds)
        per_seed = weights if weights is not None else torch.ones(config.n_seeds, len(data))
        self.weights = per_seed.float().repeat(len(stage.outputs), 1)  # a seed's G+ and G- see its sample
        self.log, self.trace = state["logs"][stage.name], state["trace"][stage.name]
        self.tolerances = certificate.Tolerances.from_config(config, n_gates)
        self.initial = next(iter(state["trace"].values()))["gates"][0]  # the fit's initial draw
        self.open_threshold = getattr(config, "threshold", 0.5)  # contrastive: its closing threshold

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, theta: Float[Tensor, "mask layer head"], index: Tensor,
                 masks: Tensor | None = None) -> dict[str, Tensor]:
        """Loss, NLL and gradients of the masks ``masks`` (default all) at ``theta`` on the examples
        ``index``, accumulated over micro-batches: the same numbers as one forward of the whole batch.
        Returns ``loss``/``nll`` ``[mask]`` and ``grad``/``task_grad`` ``[mask, layer, head]`` (the
        objective's gradient, and its data term's alone), all on the CPU."""
        lams = self.lams if masks is None else self.lams[masks]
        weights = self.weights if masks is None else self.weights[masks]
        total = weights[:, index].sum(dim=1).clamp(min=1e-12).to(self.device)  # over the global batch
        local = distributed.local_slice(index)
        micro = self.config.micro_batch_size or self.config.batch_size
        gates = HeadGates(theta.shape[1], theta.shape[2], theta.shape[0], theta=theta).to(self.device)
        data_term = torch.zeros(theta.shape[0], device=self.device)
        nll = torch.zeros_like(data_term)
        for start in range(0, len(local), micro):
            chunk = local[start : start + micro]
            with _autocast(self.config.autocast, self.device):
                term, chunk_nll = self.stage.objective(self.model, gates, self.data.subset(chunk))
            weight = weights[:, chunk].to(self.device)
            ((term.float() * weight).sum(dim=1) / total).sum().backward()
            data_term += (term.detach().float() * weight).sum(dim=1) / total
            nll += (chunk_nll.detach().float() * weight).sum(dim=1) / total
        # Each process summed its share of the weighted mean: the whole is the sum over processes.
        size = distributed.world()[1]
        task_grad = distributed.average_(gates.theta.grad).cpu() * size
        data_term, nll = distributed.average_(data_term).cpu() * size, distributed.average_(nll).cpu() * size
        passes = torch.zeros(len(self.lams))
        passes[masks if masks is not None else slice(None)] += len(index)
        self.trace["passes"] += passes
        leaf = theta.detach().cpu().float().requires_grad_(True)
        loss = regularised(data_term, leaf, lams, self.config)
        if loss.requires_grad:  # a stage with lambda = 0 has no regulariser
            loss.sum().backward()
        reg_grad = leaf.grad if leaf.grad is not None else torch.zeros_like(task_grad)
        return {"loss": loss.detach(), "nll": nll, "grad": task_grad + reg_grad, "task_grad": task_grad}

    def full_index(self) -> Tensor:
        return torch.arange(len(self.data))

    def _check_finite(self, loss: Tensor, step: int, index: Tensor, theta: Tensor, optimizer: Any) -> None:
        """Raise, naming the stage, step and examples, if a loss is not finite; with a run folder, first
        checkpoint the last good state (``theta`` and the optimiser's state as they were before this step)."""
        if torch.isfinite(loss).all():
            return
        if self.folder is not None:
            self._checkpoint(step, theta, optimizer)
        bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
        shown = index.tolist() if len(index) <= 64 else f"{index[:64].tolist()} ... ({len(index)} in all)"
        raise FloatingPointError(
            f"CHG stage '{self.stage.name}', step {step}: the loss is not finite for mask(s) {bad} "
            f"(values {loss.tolist()}) on the batch of example indices {shown}. Check the data and the "
            "model's dtype." + (f" The last good state is checkpointed in {self.folder}."
                                if self.folder is not None else "")
        )

    # ------------------------------------------------------------------ Adam
    def adam(self, theta: Float[Tensor, "mask layer head"]) -> Tensor:
        """The paper's optimiser: Adam on minibatches, the learning rate decaying linearly over ``steps``."""
        config, stage = self.config, self.stage
        param = torch.nn.Parameter(theta.detach().clone())
        optimizer = torch.optim.Adam([param], lr=stage.lr[0])
        if self.state["optimizer"] is not None:
            optimizer.load_state_dict(self.state["optimizer"])
        first = self.state["step"]
        for step in tqdm(range(first, config.steps), desc=f"CHG {stage.name}", disable=not config.progress,
                         leave=False, initial=first, total=config.steps):
            if self.folder is not None and step > first and step % config.checkpoint_every == 0:
                self._checkpoint(step, param.detach(), optimizer.state_dict())
            for group in optimizer.param_groups:
                group["lr"] = linear_lr(stage.lr, step, config.steps)
            index = self.data.batch_indices(step, config.batch_size, seed=config.seed * 1009 + stage.salt,
                                            bucket_window=config.bucket_window)
            out = self.evaluate(param.detach(), index)
            self._check_finite(out["loss"], step, index, param.detach(), optimizer.state_dict())
            param.grad = out["grad"].clone()
            per_mask_grad_clip_(param.grad, config.grad_clip)
            optimizer.step()
            self._log(out)
            done = step + 1
            if done % config.trace_every == 0 or done == config.steps:
                self._snapshot(done, param.detach())
                if config.early_stop and done < config.steps and self._cheap_checks_pass():
                    self._record_end(param.detach(), self.evaluate(param.detach(), self.full_index()))
                    if self._certified().all():
                        self.trace["stopped_at"] = done
                        return param.detach().clone()
        # The certificate needs the full-data gradient and loss where the stage ended.
        self._record_end(param.detach(), self.evaluate(param.detach(), self.full_index()))
        return param.detach().clone()

    # ------------------------------------------------------------------ L-BFGS
    def lbfgs(self, theta: Float[Tensor, "mask layer head"]) -> Tensor:
        """Full-data L-BFGS per mask (own history, own Armijo backtracking). With early stopping a mask
        stops moving once its own certificate holds on the trace so far, so the certificate's window
        checks are earned while it still moves (a mask frozen at a small gradient alone would pass them by
        construction); the stage stops once every mask has. A mask no step can improve stops too, and so,
        with early stopping, does one whose objective fell by less than its float rounding over the
        certificate's window (:meth:`_at_float_precision`), certified or not. ``settled_at`` records, per
        mask, the update where it stopped (-1: it moved to the end; a snapshot is taken there), and the
        certificate is read on the trace up to there."""
        config, stage, index = self.config, self.stage, self.full_index()
        n_masks, shape = theta.shape[0], theta.shape
        saved = self.state["optimizer"]
        if saved is not None:
            memory = lbfgs.LBFGSState.from_dict(saved["memory"])
            current, active = {k: v.clone() for k, v in saved["current"].items()}, saved["active"].clone()
            self.held = saved.get("held", torch.zeros(n_masks, shape[1] * shape[2], dtype=torch.bool))
        else:
            theta = self._box(theta)
            memory = lbfgs.LBFGSState.empty(n_masks, shape[1] * shape[2], config.lbfgs_memory)
            current, active = self.evaluate(theta, index), torch.ones(n_masks, dtype=torch.bool)
            self._check_finite(current["loss"], 0, index, theta, None)
            self.held = torch.zeros(n_masks, shape[1] * shape[2], dtype=torch.bool)
        settled = self.trace.setdefault("settled_at", torch.full((n_masks,), -1))
        x = theta.detach().clone()
        first = self.state["step"]
        for step in tqdm(range(first, config.steps), desc=f"CHG {stage.name} (L-BFGS)",
                         disable=not config.progress, leave=False, initial=first, total=config.steps):
            if self.folder is not None and step > first and step % config.checkpoint_every == 0:
                self._checkpoint(step, x, {"memory": memory.as_dict(), "current": current, "active": active,
                                           "held": self.held})
            moving = active.clone()
            x, current = self._lbfgs_step(x, current, memory, active, index, step)
            self._log(current)
            done = step + 1
            if config.early_stop:  # progress below the loss's float rounding over a window: stop there
                active &= ~self._at_float_precision(done)
            stopping = moving & ~active  # stuck: no step decreases the objective, or none visibly
            settled[stopping] = done
            # a settled mask's certificate is read up to here: snapshot it
            if done % config.trace_every == 0 or done == config.steps or not active.any() or stopping.any():
                self._snapshot(done, x)
                self._record_end(x, current)
                if config.early_stop and done < config.steps:
                    certified = self._certified()
                    settled[active & certified] = done
                    active &= ~certified
                    if certified.all():
                        self.trace["stopped_at"] = done
                        break
            if not active.any():  # nothing left to move: more updates would only repeat the last state
                break
        self._record_end(x, current)
        return x

    def _lbfgs_step(self, x: Tensor, current: dict[str, Tensor], memory: lbfgs.LBFGSState,
                    active: Tensor, index: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One iteration for every active mask: direction, backtracking line search, history update."""
        held = lbfgs.binding(x.flatten(1), current["grad"].flatten(1), self.config.clamp)
        self.held = held
        grad = current["grad"].flatten(1).masked_fill(held, 0.0)
        direction = lbfgs.direction(grad, memory).masked_fill(held, 0.0)
        slope = (grad * direction).sum(dim=1)
        uphill = slope >= 0
        if uphill.any():  # a history that no longer describes the curvature: start again from -grad
            memory.reset(uphill)
            direction[uphill], slope[uphill] = -grad[uphill], -(grad[uphill] ** 2).sum(dim=1)
        direction, slope, step_size = lbfgs.bounded_step(grad, direction, slope, memory.count > 0)
        pending = active & (slope < 0)
        new_x, new = x.clone(), {k: v.clone() for k, v in current.items()}
        for _ in range(lbfgs.MAX_TRIES):
            masks = torch.nonzero(pending).flatten()
            if len(masks) == 0:
                break
            trial = self._box(x[masks] + (step_size[masks, None] * direction[masks]).view(-1, *x.shape[1:]))
            out = self.evaluate(trial, index, masks)
            finite = torch.isfinite(out["loss"])  # a non-finite trial is a step too far: backtrack
            out["loss"] = torch.where(finite, out["loss"], torch.full_like(out["loss"], float("inf")))
            # Armijo along the projected step (slope x step, never asking less than no increase)
            moved = (grad[masks] * (trial - x[masks]).flatten(1)).sum(dim=1).clamp(max=0.0)
            accepted = finite & lbfgs.acceptable(
                current["loss"][masks], moved, torch.ones_like(moved), out["loss"],
                grad[masks], out["grad"].flatten(1).masked_fill(held[masks], 0.0))
            took = masks[accepted]
            new_x[took] = trial[accepted]
            for key in new:
                new[key][took] = out[key][accepted]
            pending[took] = False
            rejected = masks[~accepted]
            step_size[rejected] = lbfgs.backtrack(step_size[rejected], current["loss"][rejected],
                                                  slope[rejected], out["loss"][~accepted])
        stuck = pending & (memory.count == 0)  # even steepest descent finds no decrease: float precision
        active &= ~stuck
        memory.reset(pending)  # no acceptable step: the next iteration starts from steepest descent
        y = (new["grad"] - current["grad"]).flatten(1).masked_fill(held, 0.0)
        memory.push(active & ~pending, (new_x - x).flatten(1), y)
        return new_x, new

    def _at_float_precision(self, done: int) -> Tensor:
        """Masks whose objective fell by less than its float rounding over the certificate's window:
        the optimiser can no longer tell a better point from rounding, and the steps it still takes are
        driven by rounding (on 8 sva prompts stage 1's loss reaches 5e-7 and L-BFGS then walks heads
        across 0.5 for hundreds of updates at 4 s each). The role of L-BFGS-B's ``ftol``, read over the
        window rather than one update: L-BFGS in the box stalls for a few updates and then moves on."""
        length = certificate.window_updates(done, self.tolerances)
        if done <= self.tolerances.patience or length >= done:
            return torch.zeros(len(self.lams), dtype=torch.bool)
        before, now = self.log["loss"][-length - 1], self.log["loss"][-1]
        return before - now < lbfgs.FLOAT_NOISE * torch.maximum(before.abs(), now.abs()).clamp(min=1.0)

    def _box(self, theta: Tensor) -> Tensor:
        """L-BFGS searches the box [-c, c] of the gate logits (see :mod:`chg_tlens.core.lbfgs`)."""
        return lbfgs.project(theta.flatten(1), self.config.clamp).view_as(theta)

    # ------------------------------------------------------------------ certificate
    def _cheap_checks_pass(self) -> bool:
        """The certificate's trace-only checks (no new gradient needed) on the stage so far, or, for a
        stage with a known lower bound, a last minibatch loss within the bound's tolerance (worth a
        full-data pass to see whether the whole data is there too)."""
        if all(row["passes_trace_checks"] for row in self._rows(with_gradient=False)):
            return True
        floor = self.trace.get("loss_floor")
        return floor is not None and bool(((self.log["loss"][-1] - floor <= self.tolerances.bound_gap)
                                           & (self.lams == 0)).all())

    def _certified(self) -> Tensor:
        """Per mask, whether the full certificate holds on the stage so far."""
        return torch.tensor([row["certified"] for row in self._rows(with_gradient=True)])

    def _rows(self, with_gradient: bool) -> list[dict[str, Any]]:
        """The certificate on the stage so far: the same rule the result reports at the end."""
        steps, gates = torch.tensor(self.trace["steps"]), torch.stack(self.trace["gates"])
        codes = convergence.states(gates, len(self.stage.outputs) == 2, self.config.role_threshold,
                                   self.open_threshold)
        codes = codes.repeat(1, gates.shape[1] // codes.shape[1], 1, 1)  # a seed's roles for G+ and G-
        initial = self.initial.repeat(gates.shape[1] // self.initial.shape[0], 1, 1)
        return certificate.certify_settled(
            steps, gates, steps, codes, torch.stack(self.log["loss"]), initial, self.lams,
            self.trace.get("task_grad") if with_gradient else None, self.config.clamp, self.config.clamp_mode,
            self.tolerances, self.trace.get("theta") if with_gradient else None, self.trace.get("settled_at"),
            self.trace.get("full_loss") if with_gradient else None, self.trace.get("loss_floor"))

    # ------------------------------------------------------------------ bookkeeping
    def _log(self, out: dict[str, Tensor]) -> None:
        self.log["loss"].append(out["loss"].clone())
        self.log["nll"].append(out["nll"].clone())

    def _record_end(self, theta: Tensor, out: dict[str, Tensor]) -> None:
        """Where the stage stands on the whole data (``out`` from a full-data :meth:`evaluate`): what the
        certificate's gradient test and its test at the lower bound read."""
        self.trace["task_grad"], self.trace["full_loss"] = out["task_grad"].clone(), out["loss"].clone()
        self.trace["theta"] = theta.detach().clone()

    def _snapshot(self, done: int, theta: Tensor) -> None:
        self.trace["steps"].append(done)
        self.trace["gates"].append(torch.sigmoid(theta).detach().cpu().clone())

    def _checkpoint(self, step: int, theta: Tensor, optimizer: Any) -> None:
        self.state.update(stage=self.stage.name, step=step, theta=theta.detach().cpu().clone(),
                          optimizer=optimizer)
        _save(self.folder, self.state, self.started)


def regularised(data_term: Float[Tensor, " mask"], theta: Float[Tensor, "mask layer head"],
                lams: Float[Tensor, " mask"], config: GateFitConfig) -> Float[Tensor, " mask"]:
    """Eq. 1 per mask: the data term minus ``lam_m`` times mask ``m``'s clamped gate reward."""
    return torch.cat([chg_loss(data_term[m : m + 1], theta[m : m + 1], float(lams[m]), config.clamp,
                               config.clamp_mode) for m in range(len(lams))])


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
