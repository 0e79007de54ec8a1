"""HeadGates: the intervention itself must be exact, composable and independent across masks."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_bridge, randomize_final_norm
from torch import nn

from chg_tlens import HeadGates
from chg_tlens.errors import InputError
from chg_tlens.models.adapter import hook_z_name

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


def test_gates_at_one_leave_logits_unchanged():
    model = random_bridge()
    tokens = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(1))
    plain = model(tokens)
    gates = HeadGates.fixed(torch.ones(2, 4))
    with model.hooks(fwd_hooks=gates.hooks()):
        gated = model(tokens)
    assert torch.equal(plain, gated)


def test_gate_at_zero_removes_exactly_that_heads_contribution():
    # One attention-only layer without norms: logits = (resid + sum_h z_h W_O[h] + b_O) W_U, so closing
    # head h must subtract exactly z_h W_O[h] W_U.
    model = random_bridge(n_layers=1, attn_only=True, normalization=None)
    tokens = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(2))
    cache = {}

    def keep_z(z, hook):
        cache["z"] = z.detach().clone()
        return z

    with model.hooks(fwd_hooks=[(hook_z_name(0), keep_z)]):
        full = model(tokens)
    head = 2
    values = torch.ones(1, 4)
    values[0, head] = 0.0
    with model.hooks(fwd_hooks=HeadGates.fixed(values).hooks()):
        closed = model(tokens)
    contribution = cache["z"][:, :, head] @ model.W_O[0, head] @ model.W_U
    assert torch.allclose(full - closed, contribution, atol=1e-5)
    assert (full - closed).abs().max() > 1e-3


def test_gates_compose_with_a_users_own_hooks():
    model = random_bridge()
    tokens = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(3))
    seen = {}

    def record_pattern(pattern, hook):
        seen["pattern"] = pattern.shape
        return pattern

    def double_head_one(z, hook):
        z = z.clone()
        z[:, :, 1] *= 2.0
        return z

    half = torch.full((2, 4), 0.5)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", record_pattern)]):
        with model.hooks(fwd_hooks=[(hook_z_name(0), double_head_one), *HeadGates.fixed(half).hooks()]):
            both = model(tokens)
    expected_values = half.clone()
    expected_values[0, 1] = 1.0  # 2 x 0.5
    with model.hooks(fwd_hooks=HeadGates.fixed(expected_values).hooks()):
        expected = model(tokens)
    assert seen["pattern"][1] == 4
    assert torch.allclose(both, expected, atol=1e-5)
    # The user's hooks are gone afterwards, and so are the gates.
    assert torch.allclose(model(tokens), random_bridge()(tokens), atol=1e-6)


def test_each_mask_gates_only_its_own_replica():
    model = random_bridge()
    tokens = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(4))
    gates = HeadGates(2, 4, n_masks=3, seed=7)
    with model.hooks(fwd_hooks=gates.hooks()), torch.no_grad():
        joint = model(gates.repeat_batch(tokens)).reshape(3, 3, 8, -1)
    for mask in range(3):
        alone = HeadGates.fixed(gates.values()[mask].detach())
        with model.hooks(fwd_hooks=alone.hooks()), torch.no_grad():
            single = model(tokens)
        assert torch.allclose(joint[mask], single, atol=1e-5)


def test_gradients_of_one_mask_do_not_reach_another():
    model = random_bridge()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(5))
    gates = HeadGates(2, 4, n_masks=3, seed=0)
    with model.hooks(fwd_hooks=gates.hooks()):
        logits = model(gates.repeat_batch(tokens)).reshape(3, 2, 6, -1)
    logits[1].sum().backward()
    grad = gates.theta.grad
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_initial_gates_are_uniform_seeded_and_stable_when_masks_are_added():
    a = HeadGates(3, 5, n_masks=4, seed=11)
    b = HeadGates(3, 5, n_masks=4, seed=11)
    c = HeadGates(3, 5, n_masks=6, seed=11)
    d = HeadGates(3, 5, n_masks=4, seed=12)
    assert torch.equal(a.theta, b.theta)
    assert torch.equal(a.theta, c.theta[:4])
    assert not torch.equal(a.theta, d.theta)
    assert not torch.equal(a.theta[0], a.theta[1])
    many = HeadGates(30, 30, n_masks=4, seed=0).values().detach()
    assert 0.45 < float(many.mean()) < 0.55 and float(many.min()) >= 0 and float(many.max()) <= 1


def test_fixed_gates_are_exact_and_checked():
    gates = HeadGates.fixed(torch.tensor([[0.0, 1.0]]))
    assert torch.equal(gates.values(), torch.tensor([[[0.0, 1.0]]]))
    assert not gates.trainable
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        HeadGates.fixed(torch.tensor([[1.5, 0.0]]))
    with pytest.raises(ValueError, match="\\[layer, head\\]"):
        HeadGates.fixed(torch.ones(4))


def test_wrong_batch_for_masks_and_wrong_model_are_named():
    model = random_bridge()
    gates = HeadGates(2, 4, n_masks=3)
    with pytest.raises(ValueError, match="multiple of n_masks=3"):
        with model.hooks(fwd_hooks=gates.hooks()):
            model(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\[batch, pos, 6, d_head\\]"):
        with model.hooks(fwd_hooks=HeadGates(2, 6).hooks()):
            model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(InputError, match="expected a TransformerLens model"):
        HeadGates.from_model(nn.Linear(3, 3))


@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_target_logits_fast_path_equals_full_logits_for_every_mask(normalization):
    # The final norm gets a random weight (and bias): a fast path that skipped either, or caught the
    # residual on the wrong side of the norm, differs from the full logits.
    from chg_tlens.core.forward import gated_logits, gated_target_logits
    from chg_tlens.core.objectives import pick_target_logits

    model = random_bridge(normalization=normalization)
    tokens = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = model(tokens)
        written = randomize_final_norm(model, seed=3)
        assert len(written) == (2 if normalization == "LN" else 1)
        assert (model(tokens) - plain).abs().max() > 0.1  # the norm's parameters reach the logits
    target_mask = torch.zeros(3, 9, dtype=torch.bool)
    target_mask[0, 8] = target_mask[1, 2:5] = target_mask[2, 1] = True
    gates = HeadGates(2, 4, n_masks=2, seed=1)
    fast = gated_target_logits(model, gates, tokens, target_mask)
    full = pick_target_logits(gated_logits(model, gates, tokens), target_mask, n_masks=2)
    assert fast.shape == (2, 5, 20)
    assert torch.allclose(fast, full, atol=1e-5)
