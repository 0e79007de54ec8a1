"""L-BFGS for many independent small problems at once: one per gate set (mask).

The gate logits of one seed are a few hundred to a few thousand numbers, and every mask is its own fit:
mask ``m``'s loss depends only on mask ``m``'s gates. torch's ``LBFGS`` treats all parameters as one
problem (one curvature history, one line-search step), so a seed's result would depend on which other
seeds ran beside it. Here every mask keeps its own history and its own backtracking line search; one
forward pass evaluates every mask's trial point together.

    state = LBFGSState.empty(n_masks, n_params, memory=10)
    d = direction(grad, state)                      # [mask, param], a descent direction per mask
    ... evaluate trial points, accept per mask (Armijo) ...
    state.push(accepted, s, y)                      # curvature pairs of the masks that moved

The search runs in the box ``[-c, c]`` of the gate logits, c the regulariser's clamp, as a projected
quasi-Newton method in the manner of L-BFGS-B: trial points are projected onto the box, and logits on
its boundary whose descent points outwards are held there (:func:`binding`). Inside the box the
objective is smooth (the one-sided clamp's kink is on the boundary); outside it, where the paper's
unbounded logits go, the regulariser is flat and the task's gradient vanishes as the gate saturates,
so a fit without the box keeps drifting (on SmolLM2 stage 1 never settled: heads kept crossing 0.5
with gradients of 1e-6). A gate on the boundary is 0.018 or 0.982 instead of nearer 0 or 1, which the
certificate already counts as decided; roles read at 0.5 do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

ARMIJO = 1e-4
"""Sufficient decrease: accept a step when f(x + t d) <= f(x) + ARMIJO * t * grad . d."""
MAX_STEP = 2.0
"""Largest change of any gate logit in one iteration (the first, steepest-descent one is scaled to it):
a logit moved by 2 changes its gate by at most 0.46, so no step jumps a gate across its whole range."""
MAX_TRIES = 8
"""Line-search trials per iteration; a mask with no acceptable step keeps its gates and its history
is reset."""
FLOAT_NOISE = 1e-6
"""Relative rounding of a float32 loss summed over examples: decreases below it cannot be seen."""
CURVATURE_FLOOR = 1e-10
"""A pair with s . y below this (relative to |s| |y|) carries no usable curvature and is not kept
(kinks of the clamped regulariser produce such pairs)."""


@dataclass
class LBFGSState:
    """Per-mask curvature history, oldest pair first: ``s`` and ``y`` ``[mask, memory, param]``."""

    s: Float[Tensor, "mask memory param"]
    y: Float[Tensor, "mask memory param"]
    count: Int[Tensor, " mask"]

    @classmethod
    def empty(cls, n_masks: int, n_params: int, memory: int) -> LBFGSState:
        zeros = torch.zeros(n_masks, memory, n_params, dtype=torch.float64)
        return cls(zeros, zeros.clone(), torch.zeros(n_masks, dtype=torch.long))

    def push(self, which: Bool[Tensor, " mask"], s: Float[Tensor, "mask param"],
             y: Float[Tensor, "mask param"]) -> None:
        """Append ``(s, y)`` to the history of the masks in ``which`` whose pair has positive curvature."""
        sy = (s * y).sum(dim=1)
        scale = s.norm(dim=1) * y.norm(dim=1)
        keep = which & (sy > CURVATURE_FLOOR * scale.clamp(min=1e-30))
        if not keep.any():
            return
        self.s[keep] = torch.cat([self.s[keep, 1:], s[keep, None].double()], dim=1)
        self.y[keep] = torch.cat([self.y[keep, 1:], y[keep, None].double()], dim=1)
        self.count[keep] = (self.count[keep] + 1).clamp(max=self.s.shape[1])

    def reset(self, which: Bool[Tensor, " mask"]) -> None:
        """Forget the history of the masks in ``which`` (their next step is steepest descent)."""
        self.s[which] = 0.0
        self.y[which] = 0.0
        self.count[which] = 0

    def as_dict(self) -> dict[str, Tensor]:
        return {"s": self.s, "y": self.y, "count": self.count}

    @classmethod
    def from_dict(cls, saved: dict[str, Tensor]) -> LBFGSState:
        return cls(saved["s"].clone(), saved["y"].clone(), saved["count"].clone())


def direction(grad: Float[Tensor, "mask param"], state: LBFGSState) -> Float[Tensor, "mask param"]:
    """``-H grad`` per mask by the two-loop recursion (Nocedal & Wright, Alg. 7.4); with no history
    ``H`` is the identity. Empty slots of a short history have zero pairs and drop out (rho = 0)."""
    q = grad.double().clone()
    sy = (state.s * state.y).sum(dim=2)  # [mask, memory]
    rho = torch.where(sy > 0, 1.0 / sy.clamp(min=1e-300), torch.zeros_like(sy))
    memory = state.s.shape[1]
    alpha = torch.zeros_like(sy)
    for i in reversed(range(memory)):
        alpha[:, i] = rho[:, i] * (state.s[:, i] * q).sum(dim=1)
        q -= alpha[:, i, None] * state.y[:, i]
    r = initial_scaling(state) * q
    for i in range(memory):
        beta = rho[:, i] * (state.y[:, i] * r).sum(dim=1)
        r += state.s[:, i] * (alpha[:, i] - beta)[:, None]
    return (-r).to(grad.dtype)


def bounded_step(grad: Float[Tensor, "mask param"], direction: Float[Tensor, "mask param"],
                 slope: Float[Tensor, " mask"], has_history: Bool[Tensor, " mask"]
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Direction, its slope and the first trial step, with no logit moved by more than ``MAX_STEP``.

    The regulariser is linear in the logits up to its clamp, so along an unimportant head the
    curvature is ~0 and the quasi-Newton step there is huge; scaling the whole direction down to it
    would stall every other head. Each component is clipped instead (kept where that is still a descent
    direction). With no history the steepest-descent direction is scaled so its largest move is the cap.
    """
    clipped = direction.clamp(-MAX_STEP, MAX_STEP)
    clipped_slope = (grad * clipped).sum(dim=1)
    use = has_history & (clipped_slope < 0)
    direction = torch.where(use[:, None], clipped, direction)
    slope = torch.where(use, clipped_slope, slope)
    longest = direction.abs().amax(dim=1).clamp(min=1e-30)
    step = torch.where(has_history, (MAX_STEP / longest).clamp(max=1.0), MAX_STEP / longest)
    return direction, slope, step


def project(x: Float[Tensor, "mask param"], bound: float) -> Float[Tensor, "mask param"]:
    """The nearest point of the box ``[-bound, bound]``: the gate logits L-BFGS searches over."""
    return x.clamp(-bound, bound)


def binding(x: Float[Tensor, "mask param"], grad: Float[Tensor, "mask param"], bound: float
            ) -> Bool[Tensor, "mask param"]:
    """Logits on the box's boundary whose descent direction points out of it: held there (the
    active set of a bound-constrained quasi-Newton method, as in L-BFGS-B). ``grad`` is the one-sided
    derivative from inside the box (the regulariser's clamp sits on the boundary)."""
    return ((x >= bound) & (grad < 0)) | ((x <= -bound) & (grad > 0))


def acceptable(f0: Float[Tensor, " mask"], slope: Float[Tensor, " mask"], t: Float[Tensor, " mask"],
               f_trial: Float[Tensor, " mask"], g0: Float[Tensor, "mask param"],
               g_trial: Float[Tensor, "mask param"]) -> Bool[Tensor, " mask"]:
    """Armijo's sufficient decrease; or, where the decrease it asks for is below the loss's float
    rounding (near a minimum, in float32), a loss no higher than rounding allows and a smaller gradient."""
    armijo = f_trial <= f0 + ARMIJO * t * slope
    floor = FLOAT_NOISE * f0.abs().clamp(min=1.0)
    within_noise = (f_trial <= f0 + floor) & (g_trial.norm(dim=1) < g0.norm(dim=1))
    return armijo | within_noise


def initial_scaling(state: LBFGSState) -> Float[Tensor, "mask param"]:
    """The two-loop recursion's starting inverse Hessian, a diagonal per mask: per logit, sum s*y / sum y*y
    over the history (Gilbert & Lemarechal's diagonal update), where that is positive, else the usual
    scalar s'y / y'y of the newest pair. Gate logits differ in curvature by orders of magnitude (a head
    the answer rests on against one only the regulariser moves); one scalar for all would crawl on the
    flat ones or overshoot the steep ones. Bounded to [1e-2, 1e3] times the scalar."""
    sy_last = (state.s[:, -1] * state.y[:, -1]).sum(dim=1)
    yy_last = (state.y[:, -1] ** 2).sum(dim=1)
    scalar = torch.where(state.count > 0, sy_last / yy_last.clamp(min=1e-300), torch.ones_like(yy_last))
    sy = (state.s * state.y).sum(dim=1)
    yy = (state.y**2).sum(dim=1)
    diagonal = torch.where((sy > 0) & (yy > 0), sy / yy.clamp(min=1e-300), scalar[:, None])
    return torch.minimum(torch.maximum(diagonal, 1e-2 * scalar[:, None]), 1e3 * scalar[:, None])


def backtrack(t: Float[Tensor, " mask"], f0: Float[Tensor, " mask"], slope: Float[Tensor, " mask"],
              f_trial: Float[Tensor, " mask"]) -> Float[Tensor, " mask"]:
    """Next trial step after a rejected one: the minimiser of the quadratic through f(0), f'(0) and
    f(t), kept within [0.1 t, 0.5 t] so the search neither stalls nor jumps back."""
    curvature = f_trial - f0 - slope * t
    quadratic = -slope * t**2 / (2 * curvature.clamp(min=1e-30))
    return torch.minimum(torch.maximum(quadratic, 0.1 * t), 0.5 * t)
