"""Mover heads: attention on the answer and direct logit attribution, checked where the answer is known
(the composite model's hand-set heads) and against the model's own logits (random models with a
randomised final RMSNorm or LayerNorm, where frozen-scale attribution must add up exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chg_tlens.analysis import movers
from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import target_positions
from chg_tlens.errors import InputError
from chg_tlens.testbeds import composite
from tests.models_for_tests import random_bridge, randomize_final_norm

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


@pytest.fixture(scope="module")
def circuit():
    model = composite.composite_circuit()
    data = model.data(32, 0)
    return model.model, data, data.tokens[:, composite.DISTRACTOR_AT]


def _logit_diff(model, data: GateData, contrast: torch.Tensor) -> torch.Tensor:
    example, position = target_positions(data.target_mask)
    with torch.no_grad():
        logits = model(data.tokens)[example, position].float()
    return (logits.gather(-1, data.labels()[:, None]) - logits.gather(-1, contrast[:, None])).squeeze(-1)


def test_planted_movers_are_found_and_loud_distractors_are_not(circuit):
    model, data, contrast = circuit
    roles, measured = movers.mover_roles(model, data, contrast)
    # the main mover and the induction head both attend to A and copy it; 2.1 attends to A and writes
    # its opposite; the sink writer 0.1 attends to A too, with a large output the logits never read
    def heads(role: str) -> set[tuple[int, int]]:
        return {(int(layer), int(head)) for layer, head in np.argwhere(roles == role)}

    assert heads("facilitating") == {composite.MAIN, composite.INDUCTION}
    assert heads("interfering") == {composite.INTERFERING[1]}
    assert measured["answer_attention"][composite.DISTRACTORS[0]] > 0.9
    assert measured["direct_effect"][composite.DISTRACTORS[0]] == 0.0
    assert measured["direct_effect"][composite.MAIN] == pytest.approx(3.0, abs=1e-3)
    # 0.3 copies D, the contrast, into the answer space: a negative direct effect without attending to A
    assert measured["direct_effect"][composite.INTERFERING[0]] < -1.0
    assert measured["answer_attention"][composite.INTERFERING[0]] < 0.05


def test_residual_readout_is_the_models_logit_difference(circuit):
    model, data, contrast = circuit
    torch.testing.assert_close(movers.residual_logit_attribution(model, data, contrast),
                               _logit_diff(model, data, contrast), atol=1e-4, rtol=0)


def _uneven_data(n: int = 7, width: int = 10, vocab: int = 20) -> GateData:
    """Random next-token data of mixed lengths, two scored tokens per example."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (n, width), generator=generator)
    lengths = torch.tensor([width - (i % 4) for i in range(n)])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, length:] = 0
        mask[i, length - 2:length] = True
    return GateData.from_tokens(tokens, mask, lengths=lengths)


@pytest.mark.parametrize(("normalization", "n_kv"), [("RMS", None), ("LN", None), ("RMS", 2)])
def test_head_effects_add_up_through_a_real_final_norm(normalization, n_kv):
    model = random_bridge(n_layers=2, n_heads=4, normalization=normalization, seed=3, n_key_value_heads=n_kv)
    weight, *bias = randomize_final_norm(model, seed=1)
    data = _uneven_data()
    contrast = (data.labels() + 1) % 20
    unembed = model.W_U.detach()
    direction = unembed[:, data.labels()].T - unembed[:, contrast].T
    constant = (bias[0].detach() * direction).sum(-1) if bias else 0.0  # the norm's bias, not a component's
    b_u = model.b_U.detach() if getattr(model, "b_U", None) is not None else torch.zeros(20)
    expected = _logit_diff(model, data, contrast) - constant - (b_u[data.labels()] - b_u[contrast])
    whole = movers.residual_logit_attribution(model, data, contrast, batch_size=3)
    torch.testing.assert_close(whole, expected, atol=1e-4, rtol=1e-4)

    # the heads of a layer add up to that layer's attention output (less b_O), read out the same way;
    # the scale read here is the one the residual check above just anchored
    effects = movers.direct_logit_attribution(model, data, contrast, batch_size=3)
    readout = movers.final_readout(model, data.tokens)
    example, position = target_positions(data.target_mask)
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens, names_filter=lambda name: name.endswith("hook_attn_out"))
    for layer in range(2):
        out = cache[f"blocks.{layer}.hook_attn_out"][example, position]
        out = readout.read(out - model.blocks[layer].attn.b_O.detach(), readout.scale[example, position])
        assert float(effects[layer].sum()) == pytest.approx(
            float((out * direction * weight.detach()).sum(-1).mean()), abs=1e-4)

    # batches of 3 (uneven lengths, two targets each) give what one batch gives
    torch.testing.assert_close(effects, movers.direct_logit_attribution(model, data, contrast, batch_size=64))
    torch.testing.assert_close(movers.direct_logit_attribution(model, data, batch_size=2),
                               movers.direct_logit_attribution(model, data, batch_size=64))


def test_answer_attention_is_the_same_in_any_batching(circuit):
    model, data, _ = circuit
    torch.testing.assert_close(movers.answer_attention(model, data, batch_size=5),
                               movers.answer_attention(model, data, batch_size=64))


def test_bad_input_is_refused_by_name(circuit):
    model, data, contrast = circuit
    with pytest.raises(InputError, match="contrast must hold one id per scored logit"):
        movers.direct_logit_attribution(model, data, contrast[:3])
    with pytest.raises(InputError, match="within the vocabulary"):
        movers.direct_logit_attribution(model, data, contrast + 1000)
    with pytest.raises(InputError, match="batch_size"):
        movers.answer_attention(model, data, batch_size=0)
    with pytest.raises(InputError, match="effect_share"):
        movers.mover_roles(model, data, contrast, effect_share=2.0)
    per_position = GateData.from_tokens(data.tokens, data.target_mask, targets=data.tokens)
    with pytest.raises(InputError, match="per-position targets"):
        movers.answer_attention(model, per_position)
    no_copy = data.tokens.clone()
    answer = no_copy[:, -1:]
    no_copy[:, 1:-1] = torch.where(answer == 1, 2, 1)  # the answer occurs nowhere before it
    with pytest.raises(InputError, match="no answer token occurs in its prompt"):
        movers.answer_attention(model, GateData.from_tokens(no_copy, data.target_mask))
