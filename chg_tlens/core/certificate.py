"""The convergence certificate: when a stage's gates are a finished answer and not a point on the way.

Per stage and gate set (mask), read off its trace (gate snapshots, the loss of every update, and the
objective's full-data gradient where the stage ended). A mask is *certified* when all of these hold:

    window        the stage ran at least ``patience`` updates; the window is its last
                  max(patience, a quarter of its updates) updates
    no flips      no head changed state (its role; open/closed before roles exist) within the window
                  while its gate in this stage moved by more than ``flip_margin`` (a head whose gate
                  sits on the threshold, stationary, may cross it by rounding: it is counted as
                  ``borderline``, reported, and does not fail the check)
    still         the gates' mean |change| over the window, carried on for ``patience`` updates, stays
                  below ``drift`` (so a window is long against the gates' own movement, not only in
                  updates)
    flat loss     the loss changed over the window by less than its own noise there (twice the spread
                  around a fitted line), or by less than one ``unit``
    decided       (regularised masks) at most ``max_undecided`` of the gates still sit undecided
                  (0.1 < G < 0.9) within 0.05 of their initial draw
    stationary    on the whole data, every head's stationarity residual, the distance from 0 to the
                  objective's (sub)gradient in its logit, is below ``gradient`` units; a saturated gate
                  (|logit| beyond the clamp c) counts only a push back towards the middle

or, for an unregularised mask (lam = 0) whose objective has a known lower bound (the data terms of
:mod:`chg_tlens.core.fit` are cross-entropies, >= 0):

    at the bound  on the whole data, the objective where the mask stopped is within ``gradient`` x
                  ``unit`` of that bound: a global minimum to within a tenth of what the regulariser
                  pays for one gate, so no other gates fit these prompts better by more than that.
                  Stage 1 on a few prompts drives the NLL to float rounding (5e-7 on 8 sva prompts),
                  where many gate settings fit the prompts exactly and L-BFGS walks undetermined heads
                  across 0.5 on steps driven by rounding: no window ever holds still there, yet the
                  stage has done its job (a starting point that performs the task). Which of those
                  minima G+ and G- start from is part of the initial-gates error source.

The unit is the regulariser's pull on one gate logit, ``lam / n_heads`` (lam floored at 0.01 for fits
with lam = 0): the force that decides whether an unimportant head ends open or closed. A residual
below a tenth of it means no head's logit is being pushed by more than a tenth of that force: the gates
sit at a stationary point of the objective on this data, whatever optimiser and schedule got them there.
What it does not promise: that this stationary point (or minimum) is the only one (other initial
gates, or another optimiser from the same gates, may reach others: the paper's many sufficient circuits; see
``CHGResult.confidence``), nor that another sample of prompts gives the same one, nor that a tighter
``gradient`` tolerance keeps every role where the loss can be driven towards 0 (on 8 sva prompts a 10x
tighter one moved 14 stage-1 gates across 0.5 and changed 26% of roles:
``docs/results/before_settled_at/optimiser_study_n8``). An optimiser that stops moving a mask must
have the certificate read up to there (:func:`certify_settled`): the repeated states after it pass the
window checks by construction. Everything here is a pure function of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

NEAR_INITIAL = 0.05
"""A gate within this distance of its initial draw has not been moved by the fit."""
KINK = 0.05
"""Logits within this distance of the regulariser's clamp count as at its kink, where the objective's
subgradient is an interval (a gate held there by the task against the pull is stationary)."""
LAM_FLOOR = 0.01
"""Lambda used for the unit when a fit's lambda is 0, so the gradient test keeps a scale."""


@dataclass(frozen=True)
class Tolerances:
    """The certificate's thresholds, in the units described in the module docstring."""

    patience: int = 100
    drift: float = 0.01
    gradient: float = 0.1
    unit: float = 1e-4
    max_undecided: float = 0.1
    share: float = 0.25
    flip_margin: float = 0.05

    @property
    def bound_gap(self) -> float:
        """Largest distance above the objective's lower bound that certifies: ``gradient`` units of loss,
        a tenth of what the regulariser pays for one gate."""
        return self.gradient * self.unit

    @classmethod
    def from_config(cls, config: Any, n_gates: int) -> Tolerances:
        """From a config (dataclass or its JSON record) and the gates per mask (layers x heads)."""
        get = config.get if isinstance(config, dict) else lambda key, default: getattr(config, key, default)
        lam = float(get("lam", 0.1) or 0.0)
        patience = get("patience", None) or 100
        return cls(patience=int(patience), drift=float(get("stop_tolerance", 0.01)),
                   gradient=float(get("grad_tolerance", 0.1)), unit=max(lam, LAM_FLOOR) / n_gates)


def stationarity(
    task_grad: Float[Tensor, "mask layer head"],
    theta: Float[Tensor, "mask layer head"],
    lams: Float[Tensor, " mask"],
    clamp: float,
    mode: str,
    unit: float,
) -> Float[Tensor, "mask layer head"]:
    """Each head's stationarity residual in units: how hard the objective still pushes its logit.

    Inside (-c, c) that is |d objective / d theta| (at the regulariser's kink, the distance from 0 to
    the interval between its two one-sided derivatives). A saturated gate (logit beyond +-c, where the
    regulariser calls a gate clearly set) counts only a push back towards the middle: a gate the task
    drives further open or closed is decided, not unfinished (without a regulariser, stage 1's optimum
    lies at infinity for many heads). ``task_grad`` is the data term's gradient; the regulariser's is
    ``-lam / n`` where the clamp lets it act (``one_sided``: below +c for lam > 0, above -c for lam < 0;
    ``two_sided``: within +-c)."""
    n = theta.shape[1] * theta.shape[2]
    lam = lams.to(theta.dtype)[:, None, None].expand_as(theta)
    near_upper, near_lower = (theta - clamp).abs() < KINK, (theta + clamp).abs() < KINK
    if mode == "two_sided":
        active, at_kink = theta.abs() < clamp, near_upper | near_lower
    else:
        active = torch.where(lam >= 0, theta < clamp, theta > -clamp)
        at_kink = torch.where(lam >= 0, near_upper, near_lower)
    at_kink = at_kink & (lam != 0)
    inside, outside = task_grad - lam / n, task_grad
    here = torch.where(active, inside, outside)
    low = torch.where(at_kink, torch.minimum(inside, outside), here)
    high = torch.where(at_kink, torch.maximum(inside, outside), here)
    upper, lower = theta >= clamp - KINK, theta <= -clamp + KINK
    pushed_down, pushed_up = low.clamp(min=0), (-high).clamp(min=0)
    residual = torch.where(upper, pushed_down, torch.where(lower, pushed_up, pushed_down + pushed_up))
    return residual / unit


def window_updates(updates: int, tolerances: Tolerances) -> int:
    """Length of the window the certificate reads: the last max(patience, share x updates) updates."""
    return min(updates, max(tolerances.patience, math.ceil(tolerances.share * updates)))


def window_opening(steps: Int[Tensor, " snapshot"], length: int) -> int:
    """Index of the latest snapshot at or before the window's start (the state the window starts from)."""
    return int(torch.nonzero(steps <= int(steps[-1]) - length).max())


def loss_change(loss: Float[Tensor, "step mask"], length: int) -> tuple[Tensor, Tensor]:
    """Over the last ``length`` updates, the loss change a least-squares line predicts (slope x length)
    and the spread of the loss around that line (the noise the change is read against)."""
    tail = loss[-max(2, length):].double()
    x = torch.arange(tail.shape[0], dtype=torch.float64)[:, None]
    x = x - x.mean()
    slope = (x * (tail - tail.mean(dim=0))).sum(dim=0) / (x**2).sum().clamp(min=1e-12)
    residual = tail - tail.mean(dim=0) - slope * x
    return (slope * (tail.shape[0] - 1)).float(), residual.std(dim=0, correction=0).float()


def certify(
    steps: Int[Tensor, " snapshot"],
    gates: Float[Tensor, "snapshot mask layer head"],
    code_steps: Int[Tensor, " code_snapshot"],
    codes: Int[Tensor, "code_snapshot mask layer head"],
    loss: Float[Tensor, "step mask"],
    initial: Float[Tensor, "mask layer head"] | None,
    lams: Float[Tensor, " mask"],
    task_grad: Float[Tensor, "mask layer head"] | None,
    clamp: float,
    mode: str,
    tolerances: Tolerances,
    theta: Float[Tensor, "mask layer head"] | None = None,
    full_loss: Float[Tensor, " mask"] | None = None,
    loss_floor: Float[Tensor, " mask"] | None = None,
) -> list[dict[str, Any]]:
    """One row per mask: each check's figure and verdict, ``certified`` (and ``certified_by``: a
    stationary point or the objective's lower bound), ``passes_trace_checks`` (all but the gradient,
    which costs a full-data pass) and what to change when not certified.

    ``codes`` are the heads' states at ``code_steps`` (roles may be read at other updates than the
    gates); ``initial`` is the fit's initial draw (None: do not run the undecided test); ``theta`` the
    final gate logits the gradient was taken at (None: read back from the last gates); ``full_loss``
    the objective on the whole data there and ``loss_floor`` its lower bound (NaN or None: unknown, no
    test at the bound)."""
    updates = int(steps[-1])
    length = window_updates(updates, tolerances)
    long_enough = updates >= tolerances.patience
    opening = window_opening(steps, length)
    changed = (codes[window_opening(code_steps, length):] != codes[-1]).any(dim=0)
    moved = (gates[opening:] - gates[-1]).abs().amax(dim=0) > tolerances.flip_margin
    flips = (changed & moved).flatten(1).sum(dim=1)
    borderline = (changed & ~moved).flatten(1).sum(dim=1)
    span = max(1, updates - int(steps[opening]))
    drift = (gates[-1] - gates[opening]).abs().flatten(1).mean(dim=1) * tolerances.patience / span
    change, noise = loss_change(loss, length)
    if initial is not None:
        at_start = (gates[-1] - initial).abs() < NEAR_INITIAL
        undecided = (at_start & (gates[-1] > 0.1) & (gates[-1] < 0.9)).float().flatten(1).mean(dim=1)
    else:
        undecided = torch.zeros(gates.shape[1])
    if task_grad is not None:
        if theta is None:
            theta = torch.logit(gates[-1].double().clamp(1e-12, 1 - 1e-12)).float()
        gradient = stationarity(task_grad, theta, lams, clamp, mode, tolerances.unit).flatten(1).amax(dim=1)
    gap = optimality_gap(full_loss, loss_floor, gates.shape[1])
    rows = []
    for m in range(gates.shape[1]):
        regularised = float(lams[m]) != 0.0
        checks = {
            "window": long_enough,
            "no_flips": int(flips[m]) == 0,
            "still": float(drift[m]) < tolerances.drift,
            "flat_loss": abs(float(change[m])) <= max(2 * float(noise[m]), tolerances.unit),
            "decided": not regularised or float(undecided[m]) <= tolerances.max_undecided,
        }
        row = {"updates": updates, "window": length, "flips": int(flips[m]),
               "borderline": int(borderline[m]), "drift": float(drift[m]),
               "loss_change": float(change[m]), "loss_noise": float(noise[m]),
               "undecided_at_initial": float(undecided[m]),
               "gradient": float(gradient[m]) if task_grad is not None else None}
        row["gap"] = None if regularised or math.isnan(gap[m]) else gap[m]
        at_bound = row["gap"] is not None and row["gap"] <= tolerances.bound_gap
        row["passes_trace_checks"] = all(checks.values())
        checks["stationary"] = task_grad is not None and float(gradient[m]) < tolerances.gradient
        row["failed"] = ", ".join(name for name, ok in checks.items() if not ok)
        row["certified"] = all(checks.values()) or at_bound
        row["certified_by"] = ("stationary point" if all(checks.values()) else "lower bound" if at_bound
                               else "")
        row["advice"] = advice(checks, row, tolerances)
        rows.append(row)
    return rows


def optimality_gap(full_loss: Float[Tensor, " mask"] | None, loss_floor: Float[Tensor, " mask"] | None,
                   n_masks: int) -> list[float]:
    """Per mask, how far the objective on the whole data sits above its known lower bound (NaN where
    either is unknown, e.g. a result saved before both were recorded)."""
    if full_loss is None or loss_floor is None:
        return [math.nan] * n_masks
    return (full_loss.double() - loss_floor.double()).tolist()


def certify_settled(
    steps: Int[Tensor, " snapshot"],
    gates: Float[Tensor, "snapshot mask layer head"],
    code_steps: Int[Tensor, " code_snapshot"],
    codes: Int[Tensor, "code_snapshot mask layer head"],
    loss: Float[Tensor, "step mask"],
    initial: Float[Tensor, "mask layer head"] | None,
    lams: Float[Tensor, " mask"],
    task_grad: Float[Tensor, "mask layer head"] | None,
    clamp: float,
    mode: str,
    tolerances: Tolerances,
    theta: Float[Tensor, "mask layer head"] | None = None,
    settled_at: Int[Tensor, " mask"] | None = None,
    full_loss: Float[Tensor, " mask"] | None = None,
    loss_floor: Float[Tensor, " mask"] | None = None,
) -> list[dict[str, Any]]:
    """:func:`certify` with each mask read on its trace up to ``settled_at`` (the update where the
    optimiser stopped moving it; -1 or None: the end). The updates after it repeat one state, and would
    pass the window checks by construction. ``task_grad``, ``theta`` and ``full_loss`` are each mask's
    final ones, which for a mask that stopped moving are those at its ``settled_at``."""
    cuts = torch.full((gates.shape[1],), -1) if settled_at is None else settled_at.clone()
    stopped = cuts >= 0
    cuts[~stopped] = int(steps[-1])
    rows: list[dict[str, Any] | None] = [None] * gates.shape[1]
    for cut in cuts.unique().tolist():
        keep, keep_codes = steps <= cut, code_steps <= cut
        part = certify(steps[keep], gates[keep], code_steps[keep_codes], codes[keep_codes], loss[:cut],
                       initial, lams, task_grad, clamp, mode, tolerances, theta, full_loss, loss_floor)
        for m in torch.nonzero(cuts == cut).flatten().tolist():
            rows[m] = part[m]
            if stopped[m] and not part[m]["certified"]:
                rows[m]["advice"] = (
                    f"the optimiser stopped at update {cut}, where no step lowered the objective beyond its "
                    "float rounding; " + part[m]["advice"].replace(": more steps",
                                                                   ": more steps would only follow rounding"))
    return [row for row in rows if row is not None]


def advice(checks: dict[str, bool], row: dict[str, Any], tolerances: Tolerances) -> str:
    """What to change, from which checks failed and which way the loss moves."""
    if all(checks.values()):
        return "certified"
    if row["certified"]:
        return (f"certified at the objective's lower bound (within {row['gap']:.2g} of it): a global "
                "minimum; the heads these prompts leave undetermined take whichever state the optimiser "
                "left them in")
    if row["gradient"] is None and not checks["stationary"] and all(
            ok for name, ok in checks.items() if name != "stationary"):
        return "no full-data gradient recorded (fitted by an older chg_tlens): refit to certify"
    if not checks["window"]:
        return (f"fewer updates ({row['updates']}) than the window (patience {tolerances.patience}): "
                "more steps")
    rising = row["loss_change"] > max(2 * row["loss_noise"], tolerances.unit)
    falling = row["loss_change"] < -max(2 * row["loss_noise"], tolerances.unit)
    if rising:
        return "the loss is rising: a smaller learning rate"
    if falling:
        return "the loss is still falling: more steps"
    if not checks["decided"]:
        return (f"{row['undecided_at_initial']:.0%} of gates still undecided at their initial draw: "
                "more steps")
    if not (checks["no_flips"] and checks["still"]):
        if row["gradient"] is not None and row["gradient"] < tolerances.gradient:
            return (f"{row['flips']} head(s) still crossed the threshold where the objective is stationary "
                    f"(gradient {row['gradient']:.2g} units) and the loss flat: these prompts leave those "
                    "gates undetermined; use more prompts, and read roles with the seeds' error bars")
        return ("heads still change while the loss is flat within its noise: a bigger batch_size "
                "(or optimizer='lbfgs', which uses all the data)")
    return (f"the gradient is {row['gradient']:.2g} units of the regulariser's pull (needs < "
            f"{tolerances.gradient:g}): more steps")
