"""Has a stage converged? Read off its trace: gate snapshots every few updates, and the loss.

A fit keeps, per stage, the gates ``[snapshot, mask, layer, head]`` at update counts ``steps`` (0 = the
stage's starting gates, the last = its end). What a head *is* at a snapshot is its *state*: in the
regularised stages its role (from G+ and G- of the same seed at the same update), elsewhere whether
its gate is open (G >= 0.5). From that:

    flips             heads whose state changes over the last quarter of the stage
    mean_abs_dG       mean |change of G| over that window
    loss_slope        least-squares slope of the loss per update over that window
    near_initial      share of gates still within 0.05 of the stage-1 initial draw (and of those,
                      the ones still undecided, between 0.1 and 0.9: an unfinished fit)

Early stopping asks the same question over a patience window while the stage runs
(:func:`stable_over`). Everything here is a pure function of tensors: no model, no printing.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

ROLES = ("facilitating", "interfering", "irrelevant")
UNCLASSIFIED = "unclassified"
NEAR_INITIAL = 0.05
"""A gate within this distance of its initial draw has not been moved by the fit."""


def role_codes(
    g_plus: Float[Tensor, "*seed layer head"], g_minus: Float[Tensor, "*seed layer head"], threshold: float
) -> Int[Tensor, "*seed layer head"]:
    """Index into ``ROLES`` of each head's role, ``len(ROLES)`` for unclassified (best score < threshold).

    Scores: facilitating = G-, interfering = 1 - G+, irrelevant = G+ (1 - G-) (Nam et al., Table 1).
    """
    scores = torch.stack([g_minus, 1.0 - g_plus, g_plus * (1.0 - g_minus)])
    best = scores.max(dim=0)
    return torch.where(best.values >= threshold, best.indices, torch.full_like(best.indices, len(ROLES)))


def open_codes(gates: Float[Tensor, "*mask layer head"]) -> Int[Tensor, "*mask layer head"]:
    """1 where a gate is open (G >= 0.5), else 0: the state of a head in an unregularised stage."""
    return (gates >= 0.5).long()


def states(
    gates: Float[Tensor, "snapshot mask layer head"], paired: bool, threshold: float
) -> Int[Tensor, "snapshot seed layer head"]:
    """Per snapshot and seed, each head's state: its role when the masks hold G+ then G- of the same
    seeds (``paired``: the fused G+/G- stage), else open/closed per mask."""
    if paired:
        n = gates.shape[1] // 2
        return role_codes(gates[:, :n], gates[:, n:], threshold)
    return open_codes(gates)


def stable_over(steps: Int[Tensor, " snapshot"], gates: Float[Tensor, "snapshot mask layer head"],
                codes: Int[Tensor, "snapshot seed layer head"], patience: int, tolerance: float) -> bool:
    """True when, over the last ``patience`` updates, no head changed state and the gates moved by
    less than ``tolerance`` on average: the early-stopping rule."""
    last = int(steps[-1])
    if last < patience:
        return False
    since = int(torch.nonzero(steps <= last - patience).max())  # the snapshot that opens the window
    flips = (codes[since:] != codes[-1]).any()
    movement = float((gates[-1] - gates[since]).abs().mean())
    return not bool(flips) and movement < tolerance


def window_start(steps: Int[Tensor, " snapshot"], share: float = 0.25) -> int:
    """Index of the snapshot that opens the last ``share`` of the stage's updates."""
    last = int(steps[-1])
    return int(torch.nonzero(steps <= last - math.ceil(share * last)).max()) if last > 0 else 0


def flips_in_window(codes: Int[Tensor, "snapshot seed layer head"], start: int) -> Int[Tensor, " seed"]:
    """Per seed, heads whose state at some snapshot of the window differs from their final state."""
    changed = (codes[start:] != codes[-1]).any(dim=0)
    return changed.flatten(1).sum(dim=1)


def loss_slope(loss: Float[Tensor, "step mask"], share: float = 0.25) -> tuple[Tensor, Tensor]:
    """Least-squares slope of each mask's loss per update over the last ``share`` of the updates, and
    the spread of the loss around that line (the gradient noise the slope has to be read against)."""
    n = max(2, math.ceil(share * loss.shape[0]))
    tail = loss[-n:].double()
    x = torch.arange(tail.shape[0], dtype=torch.float64)[:, None]
    x = x - x.mean()
    slope = (x * (tail - tail.mean(dim=0))).sum(dim=0) / (x**2).sum().clamp(min=1e-12)
    residual = tail - tail.mean(dim=0) - slope * x
    return slope.float(), residual.std(dim=0, correction=0).float()


def temporal_stability(codes: Int[Tensor, "snapshot seed layer head"], start: int
                       ) -> Float[Tensor, "seed layer head"]:
    """Share of the window's snapshots at which each head already had its final state."""
    return (codes[start:] == codes[-1]).float().mean(dim=0)


def seed_agreement(final: Int[Tensor, "seed layer head"]) -> Float[Tensor, "seed layer head"]:
    """Share of seeds whose final state equals this seed's, per head (1 with a single seed)."""
    return (final[:, None] == final[None, :]).float().mean(dim=1)


# ----------------------------------------------------------------------------------- reading a trace
def paired_roles(
    plus: dict[str, Tensor], minus: dict[str, Tensor], threshold: float
) -> tuple[Int[Tensor, " snapshot"], Int[Tensor, "snapshot seed layer head"]]:
    """Roles over the updates of the G+ and G- stages: at every update either kept a snapshot, each
    head's role from the latest G+ and G- gates so far (a stage that stopped early keeps its end)."""
    steps = torch.unique(torch.cat([plus["steps"], minus["steps"]]))
    pick_plus = torch.searchsorted(plus["steps"], steps, right=True) - 1
    pick_minus = torch.searchsorted(minus["steps"], steps, right=True) - 1
    return steps, role_codes(plus["gates"][pick_plus], minus["gates"][pick_minus], threshold)


def stage_report(
    trace: dict[str, dict[str, Tensor]],
    losses: dict[str, dict[str, Tensor]],
    threshold: float = 0.5,
    tolerance: float = 0.01,
    patience: int = 100,
    max_near_initial: float = 0.1,
) -> list[dict]:
    """One row per stage x seed: flips, movement and loss slope over the last quarter, gates near their
    initial draw, where the stage stopped, whether it converged, and what to change if not.

    Converged = no head changed state over the last quarter, and the gates' movement there, carried
    on at the same rate for ``patience`` updates, stays below ``tolerance`` (the early-stopping rule,
    read so that a short window is not mistaken for a still one); in a regularised stage, also at
    most ``max_near_initial`` of the gates may still sit undecided (between 0.1 and 0.9) at their
    initial draw: the regulariser pulls every gate it is free to move, so one it has not moved yet is
    an unfinished fit, not a finding.
    """
    initial = trace["zero"]["gates"][0] if "zero" in trace else next(iter(trace.values()))["gates"][0]
    roles = paired_roles(trace["plus"], trace["minus"], threshold) if "plus" in trace else None
    rows = []
    order = {name: i for i, name in enumerate(("zero", "plus", "minus", "contrastive"))}
    for stage in sorted(trace, key=lambda name: (order.get(name, len(order)), name)):
        record = trace[stage]
        steps, gates = record["steps"], record["gates"]
        if stage in ("plus", "minus") and roles is not None:
            role_steps, codes = roles
            start = window_start(role_steps)
        else:
            codes, start = open_codes(gates), window_start(steps)
        flips = flips_in_window(codes, start)
        move_from = window_start(steps)
        movement = (gates[-1] - gates[move_from]).abs().flatten(1).mean(dim=1)
        at_start = (gates[-1] - initial).abs() < NEAR_INITIAL
        near = at_start.float().flatten(1).mean(dim=1)
        undecided = (at_start & (gates[-1] > 0.1) & (gates[-1] < 0.9)).float().flatten(1).mean(dim=1)
        slope, noise = loss_slope(losses[stage]["loss"])
        stopped = int(record["stopped_at"])
        window = max(1, int(steps[-1]) - int(steps[move_from]))
        drift = movement * patience / window
        for seed in range(gates.shape[1]):
            row = {"stage": stage, "seed": seed, "updates": int(steps[-1]),
                   "stopped_early": stopped >= 0, "stopped_at": stopped if stopped >= 0 else None,
                   "flips": int(flips[seed]), "flips_of": "role" if roles is not None and stage in
                   ("plus", "minus") else "open/closed",
                   "mean_abs_dG": float(movement[seed]), "loss_slope": float(slope[seed]),
                   "loss_noise": float(noise[seed]), "near_initial": float(near[seed]),
                   "undecided_at_initial": float(undecided[seed])}
            regularised = stage != "zero"
            settled = int(flips[seed]) == 0 and float(drift[seed]) < tolerance
            unpulled = regularised and float(undecided[seed]) > max_near_initial
            row["converged"] = settled and not unpulled
            row["advice"] = _advice(settled, unpulled, float(slope[seed]) * window, float(noise[seed]),
                                    float(undecided[seed]))
            rows.append(row)
    return rows


def _advice(settled: bool, unpulled: bool, drop: float, noise: float, near: float) -> str:
    if settled and not unpulled:
        return "converged"
    if unpulled and settled:
        return f"{near:.0%} of gates still undecided at their initial draw: more steps"
    if abs(drop) < noise:
        return "heads still change while the loss is flat within its noise: a bigger batch_size"
    return "the loss is still falling and heads still change: more steps"


def head_confidence(
    trace: dict[str, dict[str, Tensor]], threshold: float = 0.5
) -> Float[Tensor, "seed layer head"]:
    """How far to trust each head's role: the share of the last quarter's snapshots at which it already
    had its final role, times the share of seeds that end with the same role."""
    steps, codes = paired_roles(trace["plus"], trace["minus"], threshold)
    return temporal_stability(codes, window_start(steps)) * seed_agreement(codes[-1])


def in_words(rows: list[dict]) -> str:
    """One line per stage: converged in every seed, or which seeds did not and what to change."""
    lines = []
    for stage in dict.fromkeys(row["stage"] for row in rows):
        mine = [row for row in rows if row["stage"] == stage]
        stopped = [row["stopped_at"] for row in mine if row["stopped_early"]]
        where = f", stopped early at update {stopped[0]}" if stopped else f", {mine[0]['updates']} updates"
        failed = [row for row in mine if not row["converged"]]
        if not failed:
            lines.append(f"stage {stage}: converged in every seed{where}.")
            continue
        advice = "; ".join(dict.fromkeys(row["advice"] for row in failed))
        seeds = ", ".join(str(row["seed"]) for row in failed)
        lines.append(f"stage {stage}: not converged in seed(s) {seeds}{where}: {advice}.")
    return "\n".join(lines)
