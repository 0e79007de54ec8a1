"""Reading a fit's trace: each head's state over the updates, the certificate per stage, confidences.

A fit keeps, per stage, the gates ``[snapshot, mask, layer, head]`` at update counts ``steps`` (0 = the
stage's starting gates, the last = its end), the loss of every update and the data term's full-data
gradient where the stage ended. What a head *is* at a snapshot is its *state*: in the regularised
stages its role (from G+ and G- of the same seed at the same update), elsewhere whether its gate is
open. :func:`stage_report` runs :func:`chg_tlens.core.certificate.certify` on every stage; the fit's
early stopping runs the same function on the trace so far, so a stage that stopped early is certified
by construction. Everything here is a pure function of tensors: no model, no printing.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from chg_tlens.core import certificate

ROLES = ("facilitating", "interfering", "irrelevant")
UNCLASSIFIED = "unclassified"
STAGE_ORDER = ("zero", "plus", "minus", "contrastive")
STAGE_LAMBDA_SIGN = {"zero": 0.0, "plus": 1.0, "minus": -1.0, "contrastive": 1.0}
"""The sign each stage gives the config's lambda (for traces saved before they recorded it)."""


def role_codes(
    g_plus: Float[Tensor, "*seed layer head"], g_minus: Float[Tensor, "*seed layer head"], threshold: float
) -> Int[Tensor, "*seed layer head"]:
    """Index into ``ROLES`` of each head's role, ``len(ROLES)`` for unclassified (best score < threshold).

    Scores: facilitating = G-, interfering = 1 - G+, irrelevant = G+ (1 - G-) (Nam et al., Table 1).
    """
    scores = torch.stack([g_minus, 1.0 - g_plus, g_plus * (1.0 - g_minus)])
    best = scores.max(dim=0)
    return torch.where(best.values >= threshold, best.indices, torch.full_like(best.indices, len(ROLES)))


def open_codes(
    gates: Float[Tensor, "*mask layer head"], threshold: float = 0.5
) -> Int[Tensor, "*mask layer head"]:
    """1 where a gate is open (G >= ``threshold``), else 0: the state of a head in an unregularised stage
    (a contrastive fit closes a head below its own threshold)."""
    return (gates >= threshold).long()


def states(
    gates: Float[Tensor, "snapshot mask layer head"], paired: bool, threshold: float,
    open_threshold: float = 0.5,
) -> Int[Tensor, "snapshot seed layer head"]:
    """Per snapshot and seed, each head's state: its role when the masks hold G+ then G- of the same
    seeds (``paired``: the fused G+/G- stage), else open/closed per mask."""
    if paired:
        n = gates.shape[1] // 2
        return role_codes(gates[:, :n], gates[:, n:], threshold)
    return open_codes(gates, open_threshold)


def paired_roles(
    plus: dict[str, Tensor], minus: dict[str, Tensor], threshold: float
) -> tuple[Int[Tensor, " snapshot"], Int[Tensor, "snapshot seed layer head"]]:
    """Roles over the updates of the G+ and G- stages: at every update either kept a snapshot, each
    head's role from the latest G+ and G- gates so far (a stage that stopped early keeps its end)."""
    steps = torch.unique(torch.cat([plus["steps"], minus["steps"]]))
    pick_plus = torch.searchsorted(plus["steps"], steps, right=True) - 1
    pick_minus = torch.searchsorted(minus["steps"], steps, right=True) - 1
    return steps, role_codes(plus["gates"][pick_plus], minus["gates"][pick_minus], threshold)


def temporal_stability(codes: Int[Tensor, "snapshot seed layer head"], start: int
                       ) -> Float[Tensor, "seed layer head"]:
    """Share of the window's snapshots at which each head already had its final state."""
    return (codes[start:] == codes[-1]).float().mean(dim=0)


def seed_agreement(final: Int[Tensor, "seed layer head"]) -> Float[Tensor, "seed layer head"]:
    """Share of seeds whose final state equals this seed's, per head (1 with a single seed)."""
    return (final[:, None] == final[None, :]).float().mean(dim=1)


# ----------------------------------------------------------------------------------- reports
def stage_report(
    trace: dict[str, dict[str, Tensor]],
    losses: dict[str, dict[str, Tensor]],
    config: dict[str, Any],
    threshold: float = 0.5,
    open_threshold: float = 0.5,
) -> list[dict]:
    """One row per stage x seed: the certificate's figures and checks (see
    :mod:`chg_tlens.core.certificate`), where the stage stopped, and what to change if not certified.
    ``config`` is the fit's config record (lambda, clamp, tolerances); ``open_threshold`` is where a gate
    of a stage without roles counts as open (a contrastive fit's closing threshold)."""
    first = next(stage for stage in STAGE_ORDER + tuple(trace) if stage in trace)
    initial = trace[first]["gates"][0]
    n_gates = initial.shape[1] * initial.shape[2]
    tolerances = certificate.Tolerances.from_config(config, n_gates)
    # Roles need G+ and G- at the same update: the fused stage (the default) has them; fitted as two
    # stages, each is read by its open/closed states, as its early stopping read it while it ran.
    paired = {"plus", "minus"} <= set(trace) and bool(config.get("fuse_regularised", True))
    roles = paired_roles(trace["plus"], trace["minus"], threshold) if paired else None
    rows = []
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    for stage in sorted(trace, key=lambda name: (order.get(name, len(order)), name)):
        record = trace[stage]
        steps, gates = record["steps"], record["gates"]
        if stage in ("plus", "minus") and roles is not None:
            code_steps, codes = roles
        else:
            code_steps, codes = steps, open_codes(gates, open_threshold)
        lams = record.get("lams")
        if lams is None:
            lam = STAGE_LAMBDA_SIGN.get(stage, 0.0) * float(config.get("lam", 0.1))
            lams = torch.full((gates.shape[1],), lam)
        checked = certificate.certify_settled(
            steps, gates, code_steps, codes, losses[stage]["loss"], initial, lams, record.get("task_grad"),
            float(config.get("clamp", 4.0)), str(config.get("clamp_mode", "one_sided")), tolerances,
            record.get("theta"), record.get("settled_at"), record.get("full_loss"), record.get("loss_floor"))
        stopped = int(record["stopped_at"])
        passes, settled = record.get("passes"), record.get("settled_at")
        for seed, row in enumerate(checked):
            rows.append({"stage": stage, "seed": seed, "stopped_early": stopped >= 0,
                         "stopped_at": stopped if stopped >= 0 else None,
                         "flips_of": "role" if roles is not None and stage in ("plus", "minus")
                         else "open/closed",
                         "settled_at": int(settled[seed]) if settled is not None and settled[seed] >= 0
                         else None,
                         "example_passes": int(passes[seed]) if passes is not None else None} | row)
    return rows


CONFIDENCE_SOURCES = ("optimiser", "seeds", "optimiser+seeds")
"""What a confidence measures: whether the fit had settled on the role (``optimiser``: the share of the
certificate window's snapshots with the final role), whether other seeds reach it (``seeds``: the share of
seeds ending with the same role; seeds differ by their initial gates, and by their prompts when fitted on
resamples), or both multiplied."""


def head_confidence(
    trace: dict[str, dict[str, Tensor]], config: dict[str, Any], threshold: float = 0.5,
    source: str = "optimiser+seeds",
) -> Float[Tensor, "seed layer head"]:
    """How far to trust each head's role, from the sources ``source`` names (see ``CONFIDENCE_SOURCES``).
    A seed whose G+ and G- the optimiser stopped moving (``settled_at``) is read up to the later of the
    two, as its certificate is: the repeated states after it would count as held roles."""
    steps, codes = paired_roles(trace["plus"], trace["minus"], threshold)
    n_gates = codes.shape[-1] * codes.shape[-2]
    tolerances = certificate.Tolerances.from_config(config, n_gates)
    stability = torch.empty(codes.shape[1:])
    for seed, cut in enumerate(_role_cuts(trace, int(steps[-1]), codes.shape[1])):
        keep = steps <= cut
        length = certificate.window_updates(cut, tolerances)
        opening = certificate.window_opening(steps[keep], length)
        stability[seed] = temporal_stability(codes[keep][:, seed : seed + 1], opening)[0]
    agreement = seed_agreement(codes[-1])
    return {"optimiser": stability, "seeds": agreement, "optimiser+seeds": stability * agreement}[source]


def _role_cuts(trace: dict[str, dict[str, Tensor]], last: int, n_seeds: int) -> list[int]:
    """Per seed, the update its roles stopped changing: the later ``settled_at`` of its G+ and G-, or
    ``last`` where either moved to the end (or the trace predates ``settled_at``)."""
    cuts = []
    for seed in range(n_seeds):
        ends = [int(trace[stage]["settled_at"][seed]) if "settled_at" in trace[stage] else -1
                for stage in ("plus", "minus")]
        cuts.append(last if min(ends) < 0 else max(ends))
    return cuts


def in_words(rows: list[dict]) -> str:
    """One line per stage: certified in every seed, or which seeds were not and what to change."""
    lines = []
    for stage in dict.fromkeys(row["stage"] for row in rows):
        mine = [row for row in rows if row["stage"] == stage]
        # a row's updates end where its gate set stopped moving (G+ of a fused stage may stop before G-)
        last = max(int(row["updates"]) for row in mine)
        where = (f", stopped at update {last}" if any(row["stopped_early"] for row in mine)
                 else f", {last} updates")
        failed = [row for row in mine if not row["certified"]]
        if not failed:
            bound = [row for row in mine if row.get("certified_by") == "lower bound"]
            which = ("every seed" if len(bound) == len(mine)
                     else "seed(s) " + ", ".join(str(row["seed"]) for row in bound))
            how = (f" ({which} at the objective's lower bound, within {max(row['gap'] for row in bound):.2g}:"
                   " a global minimum)" if bound else "")
            lines.append(f"stage {stage}: certified in every seed{where}{how}.")
            continue
        advice = "; ".join(dict.fromkeys(row["advice"] for row in failed))
        seeds = ", ".join(str(row["seed"]) for row in failed)
        lines.append(f"stage {stage}: not certified in seed(s) {seeds}{where}: {advice}.")
    return "\n".join(lines)
