"""The convergence certificate on synthetic traces, where the right verdict is known by construction.

Each test names the wrong rule it rejects: a verdict that only counts updates (``updates >= 100``), one
that ignores the gradient, the loss's direction, the clamp's kink, or one of confidence's two factors.
"""

from __future__ import annotations

import pytest
import torch

from chg_tlens.core import certificate, convergence
from chg_tlens.core.objectives import chg_loss

TOL = certificate.Tolerances(patience=10, drift=0.01, gradient=0.1, unit=1e-3)


def still_trace(updates: int, every: int = 1, n_heads: int = 4, gate: float = 0.95):
    """A stage whose gates, loss and gradient have not moved: the certificate's easy yes."""
    steps = torch.arange(0, updates + 1, every)
    gates = torch.full((len(steps), 1, 1, n_heads), gate)
    loss = torch.full((updates, 1), 1.5)
    return steps, gates, loss, torch.zeros(1, 1, n_heads)


def verdict(steps, gates, loss, task_grad, lam=0.0, initial=None, tolerances=TOL):
    codes = convergence.open_codes(gates)
    return certificate.certify(steps, gates, steps, codes, loss, initial, torch.tensor([lam]), task_grad,
                               4.0, "one_sided", tolerances)[0]


def test_a_short_still_trace_is_certified():
    # Rejects "updates >= 100": 20 updates, nothing moves, the gradient is zero.
    row = verdict(*still_trace(20))
    assert row["certified"] and row["advice"] == "certified", row


def test_a_long_trace_with_a_late_flip_is_not_certified():
    # Rejects "updates >= 100" and a window read over the first updates: one head crosses 0.5 at 395/400.
    steps, gates, loss, grad = still_trace(400)
    gates[395:, 0, 0, 1] = 0.3
    row = verdict(steps, gates, loss, grad)
    assert not row["certified"] and row["flips"] == 1 and "no_flips" in row["failed"], row


def test_a_mask_is_read_up_to_where_the_optimiser_stopped_moving_it():
    # Rejects reading a frozen mask's certificate at the stage's end: a head flips at update 35 of 40
    # and the optimiser then freezes the mask; 60 repeated updates later the last window would see
    # nothing move. Read up to update 40, the flip is in the window. The other mask moved to the end.
    steps, gates, loss, grad = still_trace(100)
    gates = gates.repeat(1, 2, 1, 1)
    loss, grad = loss.repeat(1, 2), grad.repeat(2, 1, 1)
    gates[35:, 0, 0, 1] = 0.3
    codes = convergence.open_codes(gates)
    args = (steps, gates, steps, codes, loss, None, torch.zeros(2), grad, 4.0, "one_sided", TOL)
    at_end = certificate.certify(*args)
    assert at_end[0]["certified"], at_end[0]
    frozen, moving = certificate.certify_settled(*args, settled_at=torch.tensor([40, -1]))
    assert not frozen["certified"] and frozen["flips"] == 1 and frozen["updates"] == 40, frozen
    assert moving == at_end[1]


def test_flips_at_a_stationary_point_are_undetermined_gates_not_gradient_noise():
    # Rejects advice that always asks for a bigger batch: a head that crosses 0.5 late while the
    # gradient is zero and the loss flat is one the prompts do not decide; with a large gradient the
    # crossing is the optimiser still moving.
    steps, gates, loss, grad = still_trace(400)
    gates[395:, 0, 0, 1] = 0.3
    stationary = verdict(steps, gates, loss, grad)
    assert "undetermined" in stationary["advice"] and "batch" not in stationary["advice"], stationary
    moving = verdict(steps, gates, loss, torch.full_like(grad, 1.0))
    assert "batch_size" in moving["advice"] and "undetermined" not in moving["advice"], moving


def late_flips_at_a_tiny_loss(lam: float = 0.0):
    """Stage 1 on a few prompts: the loss at 1e-7, heads still crossing 0.5 at the end (as on 8 sva
    prompts, where L-BFGS walks undetermined heads across 0.5 on steps driven by rounding)."""
    steps, gates, loss, grad = still_trace(200)
    gates[190:, 0, 0, :2] = 0.2
    return steps, gates, loss * 1e-7 / 1.5, grad, lam


def at_bound(steps, gates, loss, grad, lam, full_loss, floor=0.0, settled_at=None):
    codes = convergence.open_codes(gates)
    return certificate.certify_settled(
        steps, gates, steps, codes, loss, None, torch.tensor([lam]), grad, 4.0, "one_sided", TOL,
        settled_at=settled_at, full_loss=None if full_loss is None else torch.tensor([full_loss]),
        loss_floor=None if floor is None else torch.tensor([floor]))[0]


def test_an_unregularised_mask_at_the_objectives_lower_bound_is_a_global_minimum():
    # Rejects a certificate that only knows stationary points: these gates fit the prompts to 1e-7 of
    # the cross-entropy's bound 0, so no gates do better by more than that, whichever way the heads the
    # prompts leave undetermined are set. The window checks fail; the bound certifies.
    row = at_bound(*late_flips_at_a_tiny_loss(), full_loss=1e-7)
    assert row["flips"] == 2 and "no_flips" in row["failed"], row
    assert row["certified"] and row["certified_by"] == "lower bound" and row["gap"] == pytest.approx(1e-7)
    assert "lower bound" in row["advice"]
    rows = [{"stage": "zero", "seed": 0, "stopped_early": True, "stopped_at": 200, "updates": 200} | row]
    assert "at the objective's lower bound" in convergence.in_words(rows)


@pytest.mark.parametrize("case", ["loose", "regularised", "no full-data loss", "no known bound"])
def test_the_lower_bound_certifies_only_an_unregularised_full_data_loss_within_a_tenth_unit(case):
    # Rejects, in turn: a bound test that takes any small loss (tolerance: a tenth of one gate's
    # regulariser reward, 1e-4 here); one that ignores lambda (a regularised objective's bound is not
    # attained, and its roles are what users read); one that reads the logged loss, which for Adam is a
    # minibatch's (the logged loss here is 1e-7 but the whole data's is unknown); one that assumes a
    # bound the objective does not have (contrastive CHG's data term can be negative).
    steps, gates, loss, grad, lam = late_flips_at_a_tiny_loss(0.1 if case == "regularised" else 0.0)
    full_loss = {"loose": 2e-4, "no full-data loss": None}.get(case, 1e-7)
    row = at_bound(steps, gates, loss, grad, lam, full_loss, floor=None if case == "no known bound" else 0.0)
    assert not row["certified"] and row["certified_by"] == "", row
    just_inside = at_bound(steps, gates, loss, grad, 0.0, 0.9e-4)
    assert just_inside["certified"], just_inside


def test_a_stationary_head_on_the_threshold_is_borderline_not_a_flip():
    # Rejects a flip rule blind to how far the gate moved: a head at G = 0.5 +- 0.003, its gradient 0,
    # crosses the threshold every update (the optimum sits on it) and the stage is still finished.
    steps, gates, loss, grad = still_trace(40)
    gates[:, 0, 0, 2] = 0.5 + 0.003 * (-1.0) ** torch.arange(len(steps))
    row = verdict(steps, gates, loss, grad)
    assert row["certified"] and row["flips"] == 0 and row["borderline"] == 1, row


def test_a_small_crossing_beyond_the_margin_is_a_flip():
    # Rejects a margin applied to the gate's distance from the threshold instead of its movement: the
    # head ends at 0.53 but came from 0.45 inside the window.
    steps, gates, loss, grad = still_trace(400)
    gates[:, 0, 0, 2] = 0.45
    gates[395:, 0, 0, 2] = 0.53
    row = verdict(steps, gates, loss, grad)
    assert not row["certified"] and row["flips"] == 1 and row["borderline"] == 0, row


def test_fewer_updates_than_the_patience_window_are_not_certified():
    row = verdict(*still_trace(8))
    assert not row["certified"] and "window" in row["failed"] and "more steps" in row["advice"]


def test_gates_drifting_without_flipping_are_not_certified():
    steps, gates, loss, grad = still_trace(40)
    gates[:, 0, 0, :] = torch.linspace(0.6, 0.9, len(steps))[:, None]  # never crosses 0.5, keeps moving
    row = verdict(steps, gates, loss, grad)
    assert row["flips"] == 0 and not row["certified"] and "still" in row["failed"], row


def test_a_large_gradient_or_none_at_all_is_not_certified():
    # Rejects a certificate read off the trace alone: everything is still, but one head is still pushed.
    steps, gates, loss, grad = still_trace(40)
    grad[0, 0, 2] = 0.5 * TOL.unit
    row = verdict(steps, gates, loss, grad)
    assert not row["certified"] and row["failed"] == "stationary" and abs(row["gradient"] - 0.5) < 1e-4
    assert row["passes_trace_checks"]
    row = verdict(steps, gates, loss, None)
    assert not row["certified"] and "refit" in row["advice"]


def test_the_advice_reads_the_direction_of_the_loss():
    # The old advice said "still falling" whichever way the loss moved.
    steps, gates, loss, grad = still_trace(40)
    falling = loss - torch.linspace(0, 0.1, 40)[:, None]
    rising = loss + torch.linspace(0, 0.1, 40)[:, None]
    assert "still falling" in verdict(steps, gates, falling, grad)["advice"]
    assert "rising" in verdict(steps, gates, rising, grad)["advice"]
    noisy = loss + 0.05 * torch.randn(40, 1, generator=torch.Generator().manual_seed(0))
    assert verdict(steps, gates, noisy, grad)["certified"]  # flat within its own noise


def test_a_gate_held_at_the_clamp_by_the_task_is_stationary():
    # G+ (lam > 0) pulls theta up with lam / n until the clamp c = 4; a task gradient of half that pull
    # pushing back holds the gate exactly at the kink: stationary. Away from the kink it is not.
    lam, n = 0.1, 4
    unit = lam / n
    theta = torch.tensor([[[4.0, 4.0 + 1e-3, 0.0, 6.0]]])
    task_grad = torch.tensor([[[0.5 * unit, 0.5 * unit, 0.5 * unit, 0.0]]])
    residual = certificate.stationarity(task_grad, theta, torch.tensor([lam]), 4.0, "one_sided", unit)
    assert torch.allclose(residual, torch.tensor([[[0.0, 0.0, 0.5, 0.0]]]), atol=1e-6), residual
    # G- pulls down above -c: a gate at +4 or beyond is pushed back towards the middle, and that counts.
    residual = certificate.stationarity(torch.zeros_like(theta), theta, torch.tensor([-lam]), 4.0,
                                        "one_sided", unit)
    assert torch.allclose(residual, torch.ones_like(theta), atol=1e-6), residual


def test_a_regularised_gate_left_at_its_initial_draw_is_not_certified():
    steps, gates, loss, grad = still_trace(40, gate=0.5)
    row = verdict(steps, gates, loss, grad, lam=0.1, initial=gates[0])
    assert not row["certified"] and "decided" in row["failed"] and "undecided" in row["advice"]
    assert verdict(steps, gates, loss, grad, lam=0.0, initial=gates[0])["certified"]  # stage 1: no pull


def _paired_trace(plus: torch.Tensor, minus: torch.Tensor) -> dict:
    steps = torch.arange(plus.shape[0])
    return {"plus": {"steps": steps, "gates": plus}, "minus": {"steps": steps, "gates": minus}}


def test_confidence_needs_both_stability_and_agreement_between_seeds():
    # Two seeds, two heads, 20 snapshots. Head 0: both seeds end facilitating, but seed 0 was
    # interfering until snapshot 18 (unstable, shared). Head 1: both seeds steady, one facilitating and
    # one irrelevant (stable, not shared). Either factor alone would give one of them full confidence.
    n = 20
    plus, minus = torch.full((n, 2, 1, 2), 0.9), torch.full((n, 2, 1, 2), 0.9)
    plus[:18, 0, 0, 0], minus[:18, 0, 0, 0] = 0.05, 0.05  # interfering, then facilitating
    minus[:, 1, 0, 1] = 0.05  # seed 1 head 1: irrelevant
    trace = _paired_trace(plus, minus)
    config = {"lam": 0.1, "patience": 10}
    confidence = convergence.head_confidence(trace, config)
    window = certificate.window_updates(n - 1, certificate.Tolerances(patience=10))
    assert confidence[0, 0, 0] < 1.0 and confidence[1, 0, 0] == 1.0
    assert abs(float(confidence[0, 0, 0]) - 2 / (window + 1)) < 1e-6
    assert torch.allclose(confidence[:, 0, 1], torch.tensor([0.5, 0.5]))


def test_confidence_of_a_seed_the_optimiser_stopped_is_read_up_to_where_it_stopped():
    # Rejects reading the optimiser's confidence over the repeated states of a frozen seed: seed 0's
    # head 0 turns facilitating at snapshot 38, both its gate sets stop at 40, and 60 repeated states
    # follow. Read at the end, the head held its role the whole window; read up to 40, for 3 of 11.
    n = 101
    plus, minus = torch.full((n, 2, 1, 1), 0.9), torch.full((n, 2, 1, 1), 0.9)
    plus[:38, 0, 0, 0], minus[:38, 0, 0, 0] = 0.05, 0.05
    trace = _paired_trace(plus, minus)
    config = {"lam": 0.1, "patience": 10}
    assert float(convergence.head_confidence(trace, config, source="optimiser")[0, 0, 0]) == 1.0
    for stage, settled in (("plus", [40, -1]), ("minus", [35, -1])):
        trace[stage]["settled_at"] = torch.tensor(settled)
    confidence = convergence.head_confidence(trace, config, source="optimiser")
    assert abs(float(confidence[0, 0, 0]) - 3 / 11) < 1e-6 and float(confidence[1, 0, 0]) == 1.0


def test_a_saturated_gate_counts_only_a_push_back_towards_the_middle():
    # Stage 1 has no regulariser: a head the task wants closed runs off towards -inf with a gradient that
    # shrinks but never vanishes. That gate is decided; one the task pulls back from saturation is not.
    theta = torch.tensor([[[-8.0, 8.0, -8.0, 8.0]]])
    task_grad = torch.tensor([[[1e-3, -1e-3, -1e-3, 1e-3]]])  # out, out, back in, back in
    residual = certificate.stationarity(task_grad, theta, torch.tensor([0.0]), 4.0, "one_sided", 1e-3)
    assert torch.allclose(residual, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])), residual


def test_confidence_reports_each_source_on_its_own():
    n = 20
    plus, minus = torch.full((n, 2, 1, 2), 0.9), torch.full((n, 2, 1, 2), 0.9)
    plus[:18, 0, 0, 0], minus[:18, 0, 0, 0] = 0.05, 0.05
    minus[:, 1, 0, 1] = 0.05
    trace, config = _paired_trace(plus, minus), {"lam": 0.1, "patience": 10}
    optimiser = convergence.head_confidence(trace, config, source="optimiser")
    seeds = convergence.head_confidence(trace, config, source="seeds")
    both = convergence.head_confidence(trace, config)
    assert float(optimiser[0, 0, 0]) < 1.0 and torch.equal(seeds[:, 0, 0], torch.ones(2))
    assert torch.equal(optimiser[:, 0, 1], torch.ones(2))
    assert torch.allclose(seeds[:, 0, 1], torch.full((2,), 0.5))
    assert torch.allclose(both, optimiser * seeds)


@pytest.mark.parametrize("mode", ["one_sided", "two_sided"])
@pytest.mark.parametrize("lam", [0.1, -0.1, 0.0])
def test_the_residual_is_the_objectives_gradient_away_from_kinks_and_saturation(mode, lam):
    # Inside (-c, c) and off the kinks, the residual is |d/dtheta (data - lam * mean clamp(theta))|, the
    # gradient the fit itself follows (rejects a wrong sign or a missing 1/n on the pull).
    generator = torch.Generator().manual_seed(1)
    theta = (torch.rand(2, 3, 4, generator=generator) * 7 - 3.5).requires_grad_(True)
    task_grad = torch.randn(2, 3, 4, generator=generator) * 1e-2
    lams = torch.tensor([lam, lam])
    reward = chg_loss(torch.zeros(2), theta, lam, 4.0, mode).sum()
    expected = (task_grad + torch.autograd.grad(reward, theta)[0]).abs() if lam else task_grad.abs()
    residual = certificate.stationarity(task_grad, theta.detach(), lams, 4.0, mode, unit=1.0)
    assert torch.allclose(residual, expected, atol=1e-7)


def test_the_verdict_names_where_each_gate_set_stopped_not_where_its_fused_stage_did():
    # Rejects reading the stage's stop: in the fused G+/G- stage G+ settled at 323 while G- ran to 727,
    # and its line must say 323 (its certificate is read there), not the stage's 727.
    rows = [{"stage": stage, "seed": 0, "stopped_early": True, "stopped_at": 727, "updates": updates,
             "certified": True, "certified_by": "stationary point", "advice": "certified"}
            for stage, updates in (("plus", 323), ("minus", 727))]
    assert convergence.in_words(rows).splitlines() == [
        "stage plus: certified in every seed, stopped at update 323.",
        "stage minus: certified in every seed, stopped at update 727."]
