"""Reference head sets from causal measurements (issue 26's ground truths b and c), checked on planted models
whose wiring is known: the full circuit behind the final stage (path patching into it) and necessity
from pairwise joint knockouts (which sees a backup)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_for_tests import random_bridge, random_twins, with_a_key_value_head_per_query_head

from chg_tlens.analysis.ground_truths import backup_necessity, reference_roles, upstream_heads
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.testbeds.composite import BACKUP, DISTRACTORS, INDUCTION, MAIN, PREVIOUS, composite_circuit
from chg_tlens.testbeds.wiring import FINDER, FLAG, MOVER, SIDE, UNREAD, wired_circuit
from chg_tlens.testbeds.wiring import INDUCTION as WIRED_INDUCTION
from chg_tlens.testbeds.wiring import PREVIOUS as WIRED_PREVIOUS

pytestmark = pytest.mark.tl39


def test_the_full_circuit_adds_each_feeding_head_through_the_input_it_feeds():
    """The wired model's final stage (1.0, 1.1, 2.0) is fed by 0.0 through 1.0's key, 0.2 through 1.1's
    query and 0.1 through 2.0's value; 0.3 writes loudly where nothing reads. Rejects a sender scored by
    its total effect instead of its path into the targets (0.3 is loud), one input's recording reused for
    the others (each feeder would show on every input), and the targets left out of the set."""
    wired = wired_circuit()
    targets = [WIRED_INDUCTION, FINDER, MOVER]
    found = upstream_heads(wired.model, wired.data(64, 0), targets)
    assert found.counterfactual == "corrupt" and found.total_effect > 0.5
    assert found.heads == sorted([*targets, WIRED_PREVIOUS, FLAG, SIDE])
    for feeder, kind in ((WIRED_PREVIOUS, "k"), (FLAG, "q"), (SIDE, "v")):
        effects = found.effects[:, feeder[0], feeder[1]]
        assert found.inputs[int(effects.abs().argmax())] == kind
        assert float(effects.max()) > 0.1 * found.total_effect
        others = [i for i, name in enumerate(found.inputs) if name != kind]
        assert float(effects[others].abs().max()) < 1e-4
    assert float(found.effects[:, UNREAD[0], UNREAD[1]].abs().max()) < 1e-6
    assert found.passes == 2 + 4 * (4 + 4 - 2)  # baselines, then senders in layers 0-1 (less the targets)
    roles = reference_roles(found.heads, adapter.require_model(wired.model))
    assert roles.shape == (3, 4) and (roles == "facilitating").sum() == 6


def test_the_full_circuit_on_a_grouped_query_model_equals_the_model_with_a_key_value_head_per_query_head():
    """Key and value paths through a shared key/value head are the receiver's own (heads sharing it held
    clean): the same effects as on the same function with one key/value head per query head."""
    config = dict(n_layers=3, n_heads=4, n_key_value_heads=2, seed=3)
    grouped, twins = random_bridge(**config), random_twins()
    copied = with_a_key_value_head_per_query_head(grouped, **config)
    targets = [(2, 0), (2, 3)]
    own, copy = (upstream_heads(model, twins, targets, threshold=0.0) for model in (grouped, copied))
    torch.testing.assert_close(own.effects, copy.effects, atol=1e-5, rtol=1e-4)
    assert float(own.effects[1:].abs().max()) > 1e-3  # key and value paths carry something to get wrong


def test_necessity_with_a_partner_sees_the_backup_that_removal_one_at_a_time_misses():
    """The composite model's backup mover (3.0) costs nothing alone (it acts only once the main mover 1.0
    is gone) and the main mover little (the backup takes over); each costs the task once the other is
    removed. The AND pair (0.0 -> 2.0) costs alone; the loud distractors cost nothing either way.
    Rejects necessity from single removals only (the backup missed) and a partner's own loss counted
    as the head's (every head paired with the main mover would look necessary)."""
    circuit = composite_circuit()
    candidates = [PREVIOUS, MAIN, INDUCTION, BACKUP, *DISTRACTORS]
    found = backup_necessity(circuit.model, circuit.data(64, 0), candidates, n_boot=200)
    assert found.heads == sorted([PREVIOUS, MAIN, INDUCTION, BACKUP])
    assert found.alone[BACKUP] < 0.01 and found.with_partner[BACKUP] > 0.5 and found.partner[BACKUP] == MAIN
    assert found.partner[MAIN] == BACKUP and found.necessity[MAIN] > 0.5
    assert min(found.alone[PREVIOUS], found.alone[INDUCTION]) > 0.5
    for head in DISTRACTORS:
        assert abs(found.necessity[head]) < 1e-4 and head not in found.heads
    assert found.total > found.necessity[MAIN]


def test_bad_references_are_refused_by_name():
    wired = wired_circuit()
    data = wired.data(8, 0)
    with pytest.raises(InputError, match="inputs"):
        upstream_heads(wired.model, data, [MOVER], inputs=("q", "o"))
    with pytest.raises(InputError, match="threshold"):
        upstream_heads(wired.model, data, [MOVER], threshold=-1)
    with pytest.raises(InputError, match="counterfactual"):
        upstream_heads(wired.model, data, [MOVER], counterfactual="zero")
    with pytest.raises(InputError, match="targets"):
        upstream_heads(wired.model, data, [])
    with pytest.raises(InputError, match="at least two"):
        backup_necessity(wired.model, data, [MOVER])
    assert np.array_equal(reference_roles([], adapter.require_model(wired.model)),
                          np.full((3, 4), "irrelevant", dtype=object))
