"""How well a model (optionally under gates) does a task: accuracy and log-probability on its targets.

The numbers a reader checks before trusting a fit (is the model any good at this task?) and after
ablating heads (how much did it lose?).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import gated_logits, on_device
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.objectives import target_accuracy, target_labels, target_logprobs, target_positions
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel


def task_accuracy(
    model: TransformerLensModel, data: GateData, batch_size: int = 32, gates: HeadGates | None = None
) -> dict[str, Any]:
    """Top-1 accuracy and mean target log-prob of ``model`` on ``data``, without gradients, in batches.

    Keys: ``n`` (examples); ``accuracy`` (share of examples whose every target token is the argmax);
    ``token_accuracy`` (share of target tokens that are, averaged per example); ``logprob`` (mean per
    example of its mean target-token log-prob). When every example has one target token and a corrupt
    twin whose answer sits at the same position, also ``contrast_accuracy`` (share of examples where the
    clean answer outscores the twin's answer on the clean prompt: the binary choice are/is, IO/subject)
    and ``logit_diff`` (mean clean-minus-twin answer logit). With ``gates`` the heads are gated through
    hooks; values are floats for one gate set and lists (one per mask) for several.
    """
    layout = adapter.require_model(model)
    checks.gate_data(data, model)
    checks.positive_int(batch_size, "batch_size")
    if gates is not None:
        checks.gates_for(gates, layout)
    n_masks = 1 if gates is None else gates.n_masks
    with_contrast = has_single_answer_twin(data)
    device = adapter.model_device(model)
    sums: dict[str, Tensor] = {}
    with adapter.frozen(model), torch.no_grad():
        for batch, tokens, target_mask in on_device(data, batch_size, device):
            logits = model(tokens) if gates is None else gated_logits(model, gates, tokens)
            targets = batch.targets_to(device)
            token_share = target_accuracy(logits, tokens, target_mask, n_masks, targets)
            scores = {
                "accuracy": (token_share == 1).float(),
                "token_accuracy": token_share,
                "logprob": target_logprobs(logits, tokens, target_mask, n_masks, targets),
            }
            if with_contrast:
                scores.update(_answer_contrast(logits, batch, n_masks, device))
            for key, value in scores.items():
                sums[key] = sums.get(key, 0) + value.sum(dim=1).double().cpu()
    means = {key: total / len(data) for key, total in sums.items()}
    if "contrast" in means:
        means["contrast_accuracy"] = means.pop("contrast")
    result: dict[str, Any] = {"n": len(data)}
    for key, value in means.items():
        result[key] = float(value[0]) if n_masks == 1 else [float(v) for v in value]
    return result


def has_single_answer_twin(data: GateData) -> bool:
    """True when each example has one target token and the twin's target is at the same position."""
    twin = data.corrupt
    if twin is None or twin.tokens.shape != data.tokens.shape:
        return False
    one_each = bool((data.target_mask.sum(dim=1) == 1).all())
    return one_each and bool((twin.target_mask == data.target_mask).all())


def _answer_contrast(
    logits: Float[Tensor, "mask_batch pos vocab"], batch: GateData, n_masks: int, device: torch.device
) -> dict[str, Float[Tensor, "mask batch"]]:
    """Clean answer vs twin answer, both read off the clean prompt's logits at the answer position."""
    assert batch.corrupt is not None  # guaranteed by has_single_answer_twin
    size = batch.tokens.shape[0]
    logits = logits.reshape(n_masks, size, *logits.shape[-2:])
    target_mask, targets = batch.target_mask.to(device), batch.targets_to(device)
    example, position = target_positions(target_mask, targets)
    at_answer = logits[:, example, position].float()  # [mask, batch, vocab]
    clean_answer = target_labels(batch.tokens.to(device), target_mask, targets)
    twin = batch.corrupt
    twin_answer = target_labels(twin.tokens.to(device), twin.target_mask.to(device), twin.targets_to(device))
    clean_logit = at_answer.gather(-1, clean_answer.expand(n_masks, -1).unsqueeze(-1)).squeeze(-1)
    twin_logit = at_answer.gather(-1, twin_answer.expand(n_masks, -1).unsqueeze(-1)).squeeze(-1)
    difference = clean_logit - twin_logit
    return {"contrast": (difference > 0).float(), "logit_diff": difference}

