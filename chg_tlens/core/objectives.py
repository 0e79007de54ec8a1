"""The CHG objective, as pure functions of logits, masks and gate logits.

Eq. 1 of Nam et al. (2025), one gate set:

    L(theta) = NLL(targets | prompt; G) - lambda * mean_{l,h} clamp(theta_{l,h}, -c, c)

``lambda > 0`` rewards open gates (G+, retention), ``lambda < 0`` rewards closed gates (G-, removal).
Every function keeps a leading ``mask`` axis: mask ``m`` owns replica ``m`` of the repeated batch.
The scoring functions take an optional ``targets``: ``None`` scores next tokens (the logit at ``t - 1``
against ``tokens[:, t]``), a tensor scores per position (the logit at ``t`` against ``targets[:, t]``),
for models that emit their answer at each position (compiled RASP programs).
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from chg_tlens.errors import InputError

ClampMode = Literal["one_sided", "two_sided"]


def target_positions(
    target_mask: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"] | None = None,
) -> tuple[Int[Tensor, " target"], Int[Tensor, " target"]]:
    """(example, position) of every logit that is scored.

    Next-token data (``targets is None``): token ``t`` is predicted at ``t - 1``. Per-position data
    (``targets`` given, see ``GateData.targets``): the logit at ``t`` is scored where the mask is set.
    """
    if targets is None:
        return torch.nonzero(target_mask[:, 1:], as_tuple=True)
    return torch.nonzero(target_mask, as_tuple=True)


def target_labels(
    tokens: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"] | None = None,
) -> Int[Tensor, " target"]:
    """The id each scored logit is scored against, in :func:`target_positions` order: the next token,
    or ``targets`` at the same position."""
    example, position = target_positions(target_mask, targets)
    return tokens[example, position + 1] if targets is None else targets[example, position]


def pick_target_logits(
    logits: Float[Tensor, "mask_batch pos vocab"],
    target_mask: Bool[Tensor, "batch pos"],
    n_masks: int = 1,
    targets: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "mask target vocab"]:
    """The logits that are scored, per mask, from full logits."""
    batch = target_mask.shape[0]
    example, position = target_positions(target_mask, targets)
    return logits.reshape(n_masks, batch, logits.shape[-2], logits.shape[-1])[:, example, position]


def picked_logprobs(
    picked: Float[Tensor, "mask target vocab"],
    tokens: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "mask batch"]:
    """Mean log-probability of each example's targets, from the scored logits only.

    Only scored positions go through the softmax: with a 49k-128k vocabulary that is most of the cost.
    """
    example, _ = target_positions(target_mask, targets)
    answer = target_labels(tokens, target_mask, targets)
    logprob = picked.float().log_softmax(dim=-1)
    token_logprob = logprob.gather(-1, answer.expand(picked.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return _mean_per_example(token_logprob, example, tokens.shape[0])


def picked_accuracy(
    picked: Float[Tensor, "mask target vocab"],
    tokens: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "mask batch"]:
    """Share of each example's targets that are the top-1 prediction, per mask."""
    example, _ = target_positions(target_mask, targets)
    correct = (picked.argmax(dim=-1) == target_labels(tokens, target_mask, targets)).float()
    return _mean_per_example(correct, example, tokens.shape[0])


def target_logprobs(logits: Float[Tensor, "mask_batch pos vocab"], tokens: Int[Tensor, "batch pos"],
                    target_mask: Bool[Tensor, "batch pos"], n_masks: int = 1,
                    targets: Int[Tensor, "batch pos"] | None = None) -> Float[Tensor, "mask batch"]:
    """Mean log-probability of each example's targets, per mask, from full logits."""
    picked = pick_target_logits(logits, target_mask, n_masks, targets)
    return picked_logprobs(picked, tokens, target_mask, targets)


def target_accuracy(logits: Float[Tensor, "mask_batch pos vocab"], tokens: Int[Tensor, "batch pos"],
                    target_mask: Bool[Tensor, "batch pos"], n_masks: int = 1,
                    targets: Int[Tensor, "batch pos"] | None = None) -> Float[Tensor, "mask batch"]:
    """Share of each example's targets that are the top-1 prediction, per mask, from full logits."""
    picked = pick_target_logits(logits, target_mask, n_masks, targets)
    return picked_accuracy(picked, tokens, target_mask, targets)


def answer_contrast(
    picked: Float[Tensor, "mask target vocab"],
    tokens: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    corrupt_labels: Int[Tensor, " target"],
    targets: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "mask batch"]:
    """Per example, the mean over its targets of ``-log sigmoid(logit[answer] - logit[corrupt answer])``.

    The clean-vs-corrupt contrast that patching methods measure (logit difference against the corrupt
    twin's answer), as a loss: the cross-entropy of telling the two answers apart. A head that raises
    both answers alike (a "candidate set" head) leaves it unchanged, while target NLL rewards it. It is
    bounded below by 0, like the NLL, so the regulariser's lambda keeps its scale.
    """
    example, _ = target_positions(target_mask, targets)
    answer = target_labels(tokens, target_mask, targets)
    index = torch.stack([answer, corrupt_labels.to(answer.device)], dim=-1)
    pair = picked.float().gather(-1, index.expand(picked.shape[0], -1, -1))
    per_target = torch.nn.functional.softplus(pair[..., 1] - pair[..., 0])
    return _mean_per_example(per_target, example, tokens.shape[0])


def _mean_per_example(
    per_token: Float[Tensor, "mask target"], example: Int[Tensor, " target"], batch: int
) -> Float[Tensor, "mask batch"]:
    totals = per_token.new_zeros(per_token.shape[0], batch).index_add(1, example, per_token)
    counts = torch.bincount(example, minlength=batch).clamp(min=1).to(per_token.dtype)
    return totals / counts


def target_nll(
    logits: Float[Tensor, "mask_batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
    n_masks: int = 1,
    targets: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, " mask"]:
    """Per-token mean NLL over each example's targets, then mean over the batch, per mask."""
    return -target_logprobs(logits, tokens, target_mask, n_masks, targets).mean(dim=1)


def gate_reward(
    theta: Float[Tensor, "mask layer head"], lam: float, clamp: float, mode: ClampMode = "one_sided"
) -> Float[Tensor, " mask"]:
    """``mean_{l,h}`` of the clamped gate logits that the regulariser rewards.

    ``two_sided`` is the paper's ``clamp(theta, -c, c)``. Its gradient vanishes outside [-c, c], so a
    gate pushed past -c in stage 1 can never be reopened by G+ (an irrelevant head then reads as
    interfering). ``one_sided`` clamps only on the side the regulariser pushes towards: G+ rewards
    ``min(theta, c)``, G- rewards ``max(theta, -c)``, so the pull stops only once the gate is clearly
    where the regulariser wants it.
    """
    if mode == "two_sided":
        clamped = theta.clamp(-clamp, clamp)
    elif mode == "one_sided":
        clamped = theta.clamp(max=clamp) if lam >= 0 else theta.clamp(min=-clamp)
    else:
        raise InputError(f"clamp mode must be 'one_sided' or 'two_sided', got {mode!r}.")
    return clamped.flatten(1).mean(dim=1)


def chg_loss(
    nll: Float[Tensor, " mask"],
    theta: Float[Tensor, "mask layer head"],
    lam: float,
    clamp: float,
    mode: ClampMode = "one_sided",
) -> Float[Tensor, " mask"]:
    """Eq. 1 per mask: ``NLL - lambda * mean clamp(theta)``."""
    if lam == 0:
        return nll
    return nll - lam * gate_reward(theta, lam, clamp, mode)


def contrastive_loss(
    retain_logprob: Float[Tensor, "mask batch"],
    forget_logprob: Float[Tensor, "mask batch"],
    theta: Float[Tensor, "mask layer head"],
    lam: float,
    clamp: float,
    logprob_clamp: float,
    mode: ClampMode = "one_sided",
) -> Float[Tensor, " mask"]:
    """Contrastive CHG: keep the retain version, push the forget version below it.

    ``NLL_retain + mean(clamp(logp_forget - stopgrad(logp_retain), min=-k)) - lam * mean clamp(theta)``.
    The difference is clamped so a forget item already ``k`` nats below its retain twin stops pulling.
    """
    data_term = contrastive_data_term(retain_logprob, forget_logprob, logprob_clamp).mean(dim=1)
    return chg_loss(data_term, theta, lam, clamp, mode)


def contrastive_data_term(
    retain_logprob: Float[Tensor, "mask batch"],
    forget_logprob: Float[Tensor, "mask batch"],
    logprob_clamp: float,
) -> Float[Tensor, "mask batch"]:
    """Per example, :func:`contrastive_loss` without its regulariser: retain NLL plus the clamped
    (forget - stopgrad retain) log-prob gap (the fit averages it with its own example weights)."""
    return -retain_logprob + (forget_logprob - retain_logprob.detach()).clamp(min=-logprob_clamp)


def per_mask_grad_clip_(grad: Float[Tensor, "mask layer head"], max_norm: float) -> Tensor:
    """Clip each mask's gradient to ``max_norm`` on its own, so masks stay independent fits."""
    norms = grad.flatten(1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    grad.mul_(scale[:, None, None])
    return norms

