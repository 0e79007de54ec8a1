"""Head interventions: each touches exactly the heads, positions and rows it names, records what the
model computes there, and replacing every head with another run's outputs reproduces that run."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_bridge

from chg_tlens.core import interventions
from chg_tlens.core.gates import HeadGates
from chg_tlens.errors import InputError
from chg_tlens.models.adapter import hook_z_name

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

N_LAYERS, N_HEADS, POS, BATCH = 2, 4, 7, 6


@pytest.fixture(scope="module")
def model():
    return random_bridge(n_layers=N_LAYERS, n_heads=N_HEADS, seed=3)


@pytest.fixture(scope="module")
def tokens():
    """A clean batch and another that differs from it only at positions 0-2."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 20, (BATCH, POS), generator=generator)
    other = clean.clone()
    other[:, :3] = (clean[:, :3] + torch.randint(1, 20, (BATCH, 3), generator=generator)) % 20
    return clean, other


def cached_z(model, tokens):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_z"))
    return logits, [cache[hook_z_name(layer)] for layer in range(N_LAYERS)]


def z_under(model, tokens, hooks, layer=1):
    """``layer``'s hook_z as the layer after it sees it: what the hooks returned there."""
    after, recorded = interventions.record([layer])
    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, *after]):
        logits = model(tokens)
    return logits, recorded[layer]


def test_record_returns_what_run_with_cache_holds_at_the_chosen_positions(model, tokens):
    _, cache = cached_z(model, tokens[0])
    last = torch.tensor([6, 2, 5, 0, 3, 6])
    site = torch.rand(BATCH, POS, generator=torch.Generator().manual_seed(1)) > 0.5
    for positions, expected in [
        (None, [z for z in cache]),
        (4, [z[:, 4] for z in cache]),
        (last, [z[torch.arange(BATCH), last] for z in cache]),
        (site, [z[site] for z in cache]),
    ]:
        hooks, recorded = interventions.record(range(N_LAYERS), positions=positions)
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(tokens[0])
        for layer in range(N_LAYERS):
            assert torch.equal(recorded[layer], expected[layer])
    some = torch.tensor([1, 6, 0])  # one position per row of rows 2-4
    hooks, recorded = interventions.record([1], heads=2, positions=some, rows=slice(2, 5))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens[0])
    assert torch.equal(recorded[1], cache[1][torch.arange(2, 5), some, 2])


def test_scaling_a_head_at_a_position_changes_only_that_slice_as_a_hand_written_hook_does(model, tokens):
    _, before = z_under(model, tokens[0], [])
    logits, after = z_under(model, tokens[0], [interventions.scale(1, 0.0, heads=2, positions=4)])

    def by_hand(z, hook):
        z = z.clone()
        z[:, 4, 2] = 0.0
        return z

    manual_logits, manual = z_under(model, tokens[0], [(hook_z_name(1), by_hand)])
    assert torch.equal(after, manual) and torch.equal(logits, manual_logits)
    changed = (after != before).any(dim=-1)  # [batch, pos, head]
    assert changed[:, 4, 2].all() and changed.sum() == BATCH  # that head at that position, no other entry


def test_a_factor_per_group_scales_each_replica_of_the_batch_by_its_own_row(model, tokens):
    factor = torch.rand(3, N_HEADS, generator=torch.Generator().manual_seed(2))
    z = torch.randn(3 * 2, POS, N_HEADS, 8)
    out = interventions.scaled(z, factor)
    for row in range(6):
        assert torch.allclose(out[row], z[row] * factor[row // 2][None, :, None])
    with pytest.raises(InputError, match="does not split into the factor's 4 groups"):
        interventions.scaled(z, torch.ones(4, N_HEADS))
    # HeadGates is this scale: gates of 3 masks on the batch repeated 3 times
    gates = HeadGates.fixed(torch.rand(3, N_LAYERS, N_HEADS, generator=torch.Generator().manual_seed(3)))
    hooks = [interventions.scale(layer, gates.values()[:, layer]) for layer in range(N_LAYERS)]
    with torch.no_grad():
        with model.hooks(fwd_hooks=gates.hooks()):
            gated = model(gates.repeat_batch(tokens[0]))
        with model.hooks(fwd_hooks=hooks):
            scaled = model(gates.repeat_batch(tokens[0]))
    assert torch.equal(gated, scaled)


def test_replacing_every_head_with_another_runs_outputs_reproduces_that_run(model, tokens):
    other_logits, other = cached_z(model, tokens[1])
    clean_logits, _ = cached_z(model, tokens[0])
    hooks = [interventions.replace(layer, other[layer]) for layer in range(N_LAYERS)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        patched = model(tokens[0])
    # From position 3 on the tokens agree, so the heads' outputs are the only route by which the other
    # run's earlier tokens reach there: with all of them replaced, the logits there are the other run's.
    assert not torch.allclose(clean_logits[:, 3:], other_logits[:, 3:], atol=1e-3)
    assert torch.allclose(patched[:, 3:], other_logits[:, 3:], atol=1e-5)
    assert not torch.allclose(patched[:, :3], other_logits[:, :3], atol=1e-3)  # the tokens' own paths


def test_replace_touches_only_the_named_heads_positions_and_rows(model, tokens):
    _, before = z_under(model, tokens[0], [])
    value = torch.full((N_HEADS, 8), 7.0)
    last = torch.tensor([6, 1, 3])
    _, after = z_under(model, tokens[0], [interventions.replace(1, value, heads=[1, 3], positions=last,
                                                                rows=slice(3, 6))])
    expected = before.clone()
    expected[torch.arange(3, 6)[:, None], last[:, None], torch.tensor([[1, 3]])] = 7.0
    assert torch.equal(after, expected)
    site = torch.zeros(BATCH, POS, dtype=torch.bool)
    site[0, 2] = site[4, 5] = True
    source = torch.randn(BATCH, POS, N_HEADS, 8)
    _, after = z_under(model, tokens[0], [interventions.replace(1, source, heads=0, positions=site)])
    expected = before.clone()
    expected[site, 0] = source[site, 0]
    assert torch.equal(after, expected)


def test_a_mean_over_longer_sequences_is_cut_to_the_batch_and_broadcast_over_rows(model, tokens):
    _, before = z_under(model, tokens[0], [])
    mean = torch.randn(POS + 5, N_HEADS, 8, dtype=torch.float64)  # converted to the model's dtype
    _, after = z_under(model, tokens[0], [interventions.replace(1, mean, heads=2)])
    expected = before.clone()
    expected[:, :, 2] = mean[:POS, 2].float()
    assert torch.equal(after, expected)


def test_hooks_on_one_name_run_in_order_so_a_record_sees_the_value_before_a_replace(model, tokens):
    _, cache = cached_z(model, tokens[0])
    first, seen_before = interventions.record([0])
    last, seen_after = interventions.record([0])
    value = torch.zeros(8)
    with torch.no_grad(), model.hooks(fwd_hooks=[*first, interventions.replace(0, value), *last]):
        model(tokens[0])
    assert torch.equal(seen_before[0], cache[0]) and not seen_after[0].any()
    # what is recorded is a copy: a later hook editing the activation in place leaves it as it was
    first, kept = interventions.record([0])
    with torch.no_grad(), model.hooks(fwd_hooks=[*first, (hook_z_name(0), lambda z, hook: z.zero_())]):
        model(tokens[0])
    assert torch.equal(kept[0], cache[0])


def test_probe_gradient_is_the_gradient_at_the_heads_output(model, tokens):
    _, cache = cached_z(model, tokens[0])
    hooks, leaves = interventions.probe(range(N_LAYERS))
    with model.hooks(fwd_hooks=hooks):
        probed = model(tokens[0])[:, -1].logsumexp(-1).sum()
    grads = torch.autograd.grad(probed, [leaves[layer] for layer in range(N_LAYERS)])
    # the same gradient by replacing layer 1's output with a leaf of its own value
    leaf = cache[1].clone().requires_grad_(True)
    with model.hooks(fwd_hooks=[interventions.replace(1, leaf)]):
        replaced = model(tokens[0])[:, -1].logsumexp(-1).sum()
    (expected,) = torch.autograd.grad(replaced, [leaf])
    assert torch.allclose(grads[1], expected, atol=1e-6) and grads[1].abs().sum() > 0


def test_hook_names_and_bad_activation():
    assert interventions.head_hook_name(3) == hook_z_name(3)
    assert interventions.head_hook_name(3, "v") == "blocks.3.attn.hook_v"
    with pytest.raises(InputError, match="activation"):
        interventions.head_hook_name(0, "resid")
