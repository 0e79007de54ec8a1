"""The batched forward everything shares: the batch loop, and the check that target-only logits are the
model's own logits."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_bridge
from torch import nn

from chg_tlens import CHGConfig, GateData, HeadGates, fit_chg
from chg_tlens.core.forward import check_target_logits, on_device

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


class DoubledLogits(nn.Module):
    """A TransformerLens model whose forward doubles its logits after the unembedding.

    The weights, hooks, final norm and unembedding are the wrapped model's own, so the target-only
    shortcut (stop at the final residual, then norm -> unembed -> soft cap) cannot see the doubling.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cfg, self.hook_dict, self.hooks = model.cfg, model.hook_dict, model.hooks
        self.unembed, self.ln_final = model.unembed, model.ln_final

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.model(tokens)


def _data(n: int = 7) -> GateData:
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 7, 9, 4, 6][:n]
    sequences = [torch.randint(0, 20, (length,), generator=generator).tolist() for length in lengths]
    masks = [[False] * (length - 2) + [True, True] for length in lengths]
    return GateData.from_sequences(sequences, masks)


def test_check_target_logits_passes_on_a_model_whose_output_is_norm_unembed():
    model = random_bridge(model_name="plain-toy")
    data = _data(4)
    gates = HeadGates(2, 4, n_masks=2, seed=0)
    check_target_logits(model, gates, data.tokens, data.target_mask, force=True)
    check_target_logits(model, gates, data.tokens, data.target_mask)  # now remembered as checked


def test_check_target_logits_names_a_model_that_scales_its_logits_after_the_unembedding():
    inner = random_bridge(model_name="doubled-toy")
    doubled = DoubledLogits(inner)
    data = _data(4)
    gates = HeadGates(2, 4, seed=0)
    with torch.no_grad():
        assert torch.allclose(doubled(data.tokens), 2 * inner(data.tokens))
    for _ in range(2):  # a failed check is not remembered as passed
        with pytest.raises(RuntimeError, match=r"model 'doubled-toy' \(DoubledLogits\)") as raised:
            check_target_logits(doubled, gates, data.tokens, data.target_mask)
        assert "target-only logits differ from the full logits" in str(raised.value)
    # A fit checks its first batch before any step, so it refuses the model the same way.
    with pytest.raises(RuntimeError, match="doubled-toy"):
        fit_chg(doubled, data, CHGConfig(n_seeds=1, steps=1, batch_size=4, progress=False))
    # The wrapped model itself is fine.
    check_target_logits(inner, gates, data.tokens, data.target_mask, force=True)


def test_on_device_yields_every_example_once_in_order():
    data = _data(7)
    seen_tokens, seen_masks, sizes = [], [], []
    for batch, tokens, target_mask in on_device(data, 3, "cpu"):
        assert tokens.device.type == "cpu" and torch.equal(tokens, batch.tokens)
        assert torch.equal(target_mask, batch.target_mask)
        assert tokens.shape[1] == int(batch.lengths.max())  # each batch trimmed to its longest example
        sizes.append(len(batch))
        width = data.tokens.shape[1]
        seen_tokens.append(torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]),
                                                   value=data.pad_token_id))
        seen_masks.append(torch.nn.functional.pad(target_mask, (0, width - target_mask.shape[1])))
    assert sizes == [3, 3, 1]
    assert torch.equal(torch.cat(seen_tokens), data.tokens)
    assert torch.equal(torch.cat(seen_masks), data.target_mask)


def test_per_position_data_scores_the_same_through_the_target_only_path():
    """score_gates (target-only logits) and target_logprobs on full logits read the same positions."""
    from chg_tlens.core.forward import score_gates
    from chg_tlens.core.objectives import target_accuracy, target_logprobs

    model = random_bridge(model_name="per-position-toy")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (5, 6), generator=generator)
    mask = torch.rand(5, 6, generator=generator) < 0.6
    mask[:, 0] = True  # position 0 scores too
    data = GateData.from_tokens(tokens, mask, targets=torch.randint(0, 20, (5, 6), generator=generator))
    gates = HeadGates(2, 4, n_masks=3, seed=0)
    logprob, accuracy = score_gates(model, data, gates, batch_size=2)
    with torch.no_grad(), model.hooks(fwd_hooks=gates.hooks()):
        logits = model(gates.repeat_batch(tokens))
    assert torch.allclose(logprob, target_logprobs(logits, tokens, mask, 3, data.targets), atol=1e-5)
    assert torch.equal(accuracy, target_accuracy(logits, tokens, mask, 3, data.targets))
