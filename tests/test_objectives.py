"""Eq. 1, term by term: the NLL counts targets only, and the regulariser pulls the right way."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chg_tlens.core.objectives import (
    chg_loss,
    contrastive_loss,
    gate_reward,
    per_mask_grad_clip_,
    target_accuracy,
    target_logprobs,
    target_nll,
)

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


def reference_nll(logits, tokens, target_mask):
    """The slow obvious way: full log-softmax, masked mean per example, mean over the batch."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_lp = logprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = target_mask[:, 1:].float()
    return -((token_lp * mask).sum(1) / mask.sum(1)).mean()


def test_target_nll_matches_the_obvious_computation_per_mask():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (4, 7), generator=generator)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[0, 6] = True
    mask[1, 3:5] = True
    mask[2, 1:] = True
    mask[3, 2] = True
    logits = torch.randn(3 * 4, 7, 11, generator=generator)
    nll = target_nll(logits, tokens, mask, n_masks=3)
    for m in range(3):
        assert torch.allclose(nll[m], reference_nll(logits[m * 4 : (m + 1) * 4], tokens, mask), atol=1e-6)


def test_prompt_tokens_do_not_count():
    tokens = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[False, False, True]])
    logits = torch.zeros(1, 3, 5)
    base = target_logprobs(logits, tokens, mask)
    logits[0, 0, 2] = 10.0  # the prompt position predicting token 2: not a target
    assert torch.equal(target_logprobs(logits, tokens, mask), base)
    logits[0, 1, 3] = 10.0  # the position predicting the target
    assert target_logprobs(logits, tokens, mask) > base
    assert target_accuracy(logits, tokens, mask).item() == 1.0


def test_positive_lambda_rewards_open_gates_and_negative_rewards_closed():
    theta = torch.zeros(1, 2, 3, requires_grad=True)
    nll = torch.zeros(1)
    chg_loss(nll, theta, lam=0.1, clamp=4.0).sum().backward()
    assert (theta.grad < 0).all()  # descending the loss raises theta: G+ opens
    theta.grad = None
    chg_loss(nll, theta, lam=-0.1, clamp=4.0).sum().backward()
    assert (theta.grad > 0).all()  # G- closes


@pytest.mark.parametrize("lam", [0.1, -0.1])
def test_one_sided_clamp_keeps_pulling_from_the_far_side(lam):
    far = torch.full((1, 1, 1), -6.0 if lam > 0 else 6.0, requires_grad=True)
    gate_reward(far, lam, 4.0, "two_sided").sum().backward()
    assert far.grad.abs().sum() == 0  # the reference's clamp is flat out there: the gate is frozen
    far.grad = None
    gate_reward(far, lam, 4.0, "one_sided").sum().backward()
    assert far.grad.abs().sum() > 0
    done = torch.full((1, 1, 1), 6.0 if lam > 0 else -6.0, requires_grad=True)
    gate_reward(done, lam, 4.0, "one_sided").sum().backward()
    assert done.grad.abs().sum() == 0  # clearly on its side: the pull stops


def test_regulariser_is_a_mean_over_heads():
    theta = torch.tensor([[[1.0, 5.0], [-5.0, 0.0]]])
    assert torch.allclose(gate_reward(theta, 0.1, 4.0, "two_sided"), torch.tensor([(1 + 4 - 4 + 0) / 4]))
    assert torch.allclose(gate_reward(theta, 0.1, 4.0, "one_sided"), torch.tensor([(1 + 4 - 5 + 0) / 4]))
    assert torch.allclose(gate_reward(theta, -0.1, 4.0, "one_sided"), torch.tensor([(1 + 5 - 4 + 0) / 4]))
    with pytest.raises(ValueError, match="clamp mode"):
        gate_reward(theta, 0.1, 4.0, "sideways")


def test_contrastive_loss_stops_pulling_once_forget_is_far_below():
    theta = torch.zeros(1, 1, 2)
    retain = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    forget = torch.tensor([[-1.5, -9.0]], requires_grad=True)
    contrastive_loss(retain, forget, theta, lam=0.0, clamp=4.0, logprob_clamp=5.0).sum().backward()
    assert forget.grad[0, 0] > 0 and forget.grad[0, 1] == 0
    assert torch.allclose(retain.grad, torch.tensor([[-0.5, -0.5]]))  # only the NLL term; gap is stop-grad


def test_grad_clip_is_per_mask():
    grad = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])
    norms = per_mask_grad_clip_(grad, 1.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5]))
    assert torch.allclose(grad[0].norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(grad[1], torch.tensor([[0.3, 0.4]]))


def test_per_position_targets_score_the_logit_at_the_same_position():
    """Hand-computed: logits at positions 1 and 2 scored against targets there, not the next tokens."""
    log = torch.log
    logits = torch.zeros(1, 3, 3)
    logits[0, 1] = log(torch.tensor([1.0, 3.0, 1.0]))  # softmax [1/5, 3/5, 1/5]
    logits[0, 2] = log(torch.tensor([3.0, 1.0, 1.0]))  # softmax [3/5, 1/5, 1/5]
    tokens = torch.tensor([[0, 0, 0]])
    mask = torch.tensor([[False, True, True]])
    targets = torch.tensor([[0, 1, 2]])
    expected = (math.log(3 / 5) + math.log(1 / 5)) / 2
    assert torch.allclose(target_logprobs(logits, tokens, mask, targets=targets), torch.tensor([[expected]]))
    assert torch.allclose(target_nll(logits, tokens, mask, targets=targets), torch.tensor([-expected]))
    assert torch.equal(target_accuracy(logits, tokens, mask, targets=targets), torch.tensor([[0.5]]))
    # The default reads the same logits as next-token predictions: tokens 1 and 2 (both id 0) from
    # positions 0 (uniform) and 1.
    next_token = target_logprobs(logits, tokens, mask)
    assert torch.allclose(next_token, torch.tensor([[(math.log(1 / 3) + math.log(1 / 5)) / 2]]))
    # Position 0 can be scored too: it has no earlier position, but per-position data needs none.
    first = torch.tensor([[True, False, False]])
    assert torch.allclose(target_logprobs(logits, tokens, first, targets=targets),
                          torch.tensor([[math.log(1 / 3)]]))
