"""The 32-head composite model: its roles are what its docstring says, and it separates methods that
the one-mechanism toys cannot (one-at-a-time scores miss the backup head, patching misses the head
whose output the corruption does not change, CHG finds both)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chg_tlens.analysis import acdc, baselines
from chg_tlens.analysis.ablation import evaluate_gates
from chg_tlens.core.config import CHGConfig
from chg_tlens.core.fit import fit_chg
from chg_tlens.testbeds import composite

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


@pytest.fixture(scope="module")
def circuit():
    model = composite.composite_circuit()
    return model, model.data(48, 0)


def _logprob_without(circuit, heads_off: list[tuple[int, int]]) -> float:
    model, data = circuit
    gates = torch.ones(1, composite.N_LAYERS, composite.N_HEADS)
    for head in heads_off:
        gates[0][head] = 0.0
    logprob, _ = evaluate_gates(model.model, data, gates)
    return float(logprob[0])


def test_roles_are_what_the_construction_says(circuit):
    model, _ = circuit
    roles = model.true_roles()
    assert roles.size == 32 and (roles == "facilitating").sum() == 4 and (roles == "interfering").sum() == 2
    full = _logprob_without(circuit, [])
    assert full > -0.2
    irrelevant = [tuple(int(i) for i in h) for h in np.argwhere(roles == "irrelevant")]
    assert abs(_logprob_without(circuit, irrelevant) - full) < 1e-4  # every irrelevant head at once
    for head in composite.INTERFERING:
        assert _logprob_without(circuit, [head]) > full + 0.02
    for head in (composite.PREVIOUS, composite.INDUCTION):  # the AND: either half alone kills the route
        assert _logprob_without(circuit, [head]) < full - 0.5
    # the backup: each mover alone is dispensable, together they are not
    assert abs(_logprob_without(circuit, [composite.MAIN]) - full) < 1e-4
    assert abs(_logprob_without(circuit, [composite.BACKUP]) - full) < 1e-4
    assert _logprob_without(circuit, [composite.MAIN, composite.BACKUP]) < full - 0.5


def test_distractors_are_loud_but_unread(circuit):
    model, data = circuit
    with torch.no_grad():
        _, cache = model.model.run_with_cache(data.tokens)
    norms = {}
    for layer, head in [*composite.DISTRACTORS, composite.MAIN]:
        z = cache[f"blocks.{layer}.attn.hook_z"][:, -2, head]  # at the predicting position
        w_o = model.model.blocks[layer].attn.W_O[head]
        norms[(layer, head)] = float((z @ w_o.detach()).norm(dim=-1).mean())
    assert all(norms[head] > 3 * norms[composite.MAIN] for head in composite.DISTRACTORS)


def test_one_at_a_time_methods_miss_the_backup_and_patching_misses_the_unchanged_half(circuit):
    model, data = circuit
    zero = baselines.ablation_scores(model.model, data, "zero")
    patching = baselines.activation_patching(model.model, data, "noise")
    pruned = acdc.acdc(model.model, data)
    assert abs(float(zero.scores[composite.BACKUP])) < 1e-4  # the main mover covers for it
    assert abs(float(patching.scores[composite.BACKUP])) < 1e-4
    assert not pruned.details["kept"][composite.BACKUP]  # ACDC visits it first, with the main mover on
    # the previous-token head writes the same thing in the corrupt twin, so patching it changes nothing
    assert abs(float(patching.scores[composite.PREVIOUS])) < 1e-4
    assert not pruned.details["kept"][composite.PREVIOUS]
    assert float(zero.scores[composite.PREVIOUS]) > 0.5  # zeroing it does show it


def test_chg_finds_the_backup_and_ranks_the_composition_above_every_irrelevant_head(circuit):
    """The previous-token head feeds a saturated attention score (query scale 60): a gate of ~0.15
    already keeps the induction head on target, so G- leaves it only that open. CHG ranks it above
    every irrelevant head but below its role threshold: a real limit of soft gates, kept visible here."""
    model, data = circuit
    result = fit_chg(model.model, data, CHGConfig(n_seeds=3, steps=100, batch_size=32, progress=False))
    best = result.facilitating.max(dim=0).values
    for head in (composite.MAIN, composite.BACKUP, composite.INDUCTION):
        assert best[head] > 0.5, head
    irrelevant = torch.as_tensor(model.true_roles() == "irrelevant")
    assert best[irrelevant].max() < 0.05
    assert best[composite.PREVIOUS] > 2 * best[irrelevant].max()


def test_joint_knockouts_see_the_backup_and_the_and_that_single_knockouts_miss():
    """Ground truth (c) of the comparison: necessity from joint knockouts. The main and backup movers
    each cost nothing alone (the backup takes over) but everything together: redundancy = joint - sum of
    singles > 0, with an interval above 0. The AND pair (previous-token -> induction) costs as much
    together as either alone: redundancy < 0. Heads that do nothing: 0. Rejects a 'joint' that is the sum of
    the singles (redundancy 0 everywhere) and one that knocks out only the set's first head."""
    from chg_tlens.analysis.knockouts import joint_knockout
    from chg_tlens.testbeds.composite import BACKUP, INDUCTION, MAIN, PREVIOUS, composite_circuit

    circuit = composite_circuit()
    data = circuit.data(64, 0)
    movers = joint_knockout(circuit.model, data, [MAIN, BACKUP], n_boot=200)
    assert max(movers.singles) < 0.01 and movers.joint > 0.5 and movers.redundancy_low > 0.5
    pair = joint_knockout(circuit.model, data, [PREVIOUS, INDUCTION], n_boot=200)
    assert min(pair.singles) > 0.5 and pair.redundancy_high < -0.5
    idle = joint_knockout(circuit.model, data, [(0, 4), (1, 5)], n_boot=50)
    assert abs(idle.joint) < 1e-6 and abs(idle.redundancy) < 1e-6
