"""The paper's validations where the answer is known: function-vector heads, targeted ablation in all
three directions, and many sufficient circuits, on planted models and hand-built results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from models_for_tests import random_bridge
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from chg_tlens import CHGResult, GateData
from chg_tlens.analysis.validate import (
    AblationDirection,
    ablation_summary,
    function_vector_heads,
    mediation_test,
    seed_circuits,
    sufficient_circuits,
    targeted_ablation,
)
from chg_tlens.tasks import function, make_task
from chg_tlens.tasks.function import FUNCTIONS
from chg_tlens.testbeds.benchmark_models import redundant_circuit
from chg_tlens.testbeds.planted import function_vector_circuit

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

OPEN, CLOSED = 6.0, -6.0  # gate logits: sigmoid 0.998 and 0.002
PLAN = {"facilitating": (OPEN, OPEN), "interfering": (CLOSED, CLOSED), "irrelevant": (OPEN, CLOSED)}
"""Role -> (G+ logit, G- logit) that gives that role."""


def result_with_roles(roles: np.ndarray) -> CHGResult:
    """A CHGResult whose roles are ``roles`` (``[seed, layer, head]`` or ``[layer, head]`` names).

    Logits shrink a little head by head, so each role's score orders its heads in flat index order."""
    roles = np.asarray(roles, dtype=object)
    roles = roles[None] if roles.ndim == 2 else roles
    plus = torch.tensor([[[PLAN[r][0] for r in row] for row in seed] for seed in roles])
    minus = torch.tensor([[[PLAN[r][1] for r in row] for row in seed] for seed in roles])
    shrink = 1.0 - 0.01 * torch.arange(plus[0].numel()).view(plus.shape[1:])
    return CHGResult(torch.zeros_like(plus), plus * shrink, minus * shrink)


# ---------------------------------------------------------------------- function-vector heads
@pytest.fixture(scope="module")
def fv_circuit():
    return function_vector_circuit()


@pytest.fixture(scope="module")
def fv_result(fv_circuit):
    return function_vector_heads(fv_circuit.model, fv_circuit.data(48, 0), top_k=2, progress=False)


def test_the_planted_function_vector_head_tops_the_indirect_effect(fv_circuit, fv_result):
    assert fv_result.heads[0] == fv_circuit.extra["function_vector_head"] == (1, 0)
    assert fv_result.clean_probability > 0.95 and fv_result.corrupt_probability < 0.1
    aie = fv_result.aie
    assert aie.shape == (3, 2)
    # Its mean clean output restores the answer on shuffled prompts: nearly the whole clean-corrupt gap.
    gap = fv_result.clean_probability - fv_result.corrupt_probability
    assert aie[1, 0] > 0.9 * gap
    others = aie.flatten()[torch.arange(6) != 2]
    assert (others < 0.15).all()  # the query-reading head 2.0 gets a little from its mean answer
    assert aie[0, 0] == pytest.approx(0.0, abs=1e-3)  # the checker is silent at the query position
    assert fv_result.flags.sum() == 2 and fv_result.flags[1, 0]
    assert fv_result.n_examples == 48 and fv_result.forward_passes == 48 + 48 * (1 + 6)
    assert fv_result.seconds > 0
    frame = fv_result.to_frame()
    assert frame.loc[frame["rank"] == 1, ["layer", "head"]].values.tolist() == [[1, 0]]


def test_indirect_effects_do_not_depend_on_how_heads_share_a_pass(fv_circuit, fv_result):
    one_at_a_time = function_vector_heads(fv_circuit.model, fv_circuit.data(48, 0), top_k=2,
                                          batch_size=48, progress=False)
    ragged = function_vector_heads(fv_circuit.model, fv_circuit.data(48, 0), top_k=2, batch_size=20,
                                   progress=False)
    assert torch.allclose(one_at_a_time.aie, fv_result.aie, atol=1e-5)
    assert torch.allclose(ragged.aie, fv_result.aie, atol=1e-5)


def test_without_shuffled_labels_there_is_no_effect_to_carry(fv_circuit):
    data = fv_circuit.data(16, 1)
    same = function_vector_heads(fv_circuit.model, data, corrupt=data, top_k=1, progress=False)
    assert same.aie.max() < 0.01  # no head can raise an answer the clean prompt already gets right
    assert same.aie[1, 0] == pytest.approx(0.0, abs=1e-3)  # the task vector is the same in every prompt
    assert same.aie[2, 0] < -0.5  # the query-reading head's mean answer is nobody's answer


def test_function_vector_mediation_uses_max_facilitation_over_seeds(fv_circuit, fv_result):
    roles = np.stack([fv_circuit.true_roles()] * 2)
    roles[1, 1, 0] = "irrelevant"  # one seed does without the function-vector head: max still counts it
    result = result_with_roles(roles)
    test = fv_result.mediation_test(result)
    direct = mediation_test(result, fv_result.heads)
    assert test["t"] == pytest.approx(direct["t"]) and test["p"] == pytest.approx(direct["p"])
    assert test["facilitation_flagged"] > 0.9 > test["facilitation_rest"] and test["t"] > 0
    assert test["spearman_rho"] > 0
    assert fv_result.mediation_test(result, seed_reduce=1)["facilitation_flagged"] < 0.6


def test_function_vector_heads_refuses_bad_input(fv_circuit, fv_result):
    data = fv_circuit.data(8, 0)
    assert len(function_vector_heads(fv_circuit.model, data, progress=False).heads) == 6  # top 10 of 6
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        function_vector_heads(fv_circuit.model, data, top_k=0, progress=False)
    other_answers = data.corrupt.tokens.clone()
    other_answers[:, -1] = torch.where(other_answers[:, -1] == 7, 8, 7)
    twin = GateData.from_tokens(other_answers, data.target_mask)
    with pytest.raises(ValueError, match="corrupt: example 0's answer differs"):
        function_vector_heads(fv_circuit.model, data, corrupt=twin, top_k=2, progress=False)
    with pytest.raises(ValueError, match="no corrupt twin"):
        function_vector_heads(fv_circuit.model, GateData.from_tokens(data.tokens, data.target_mask),
                              top_k=2, progress=False)
    with pytest.raises(ValueError, match="function-vector scores are \\[3, 2\\]"):
        fv_result.mediation_test(result_with_roles(np.full((2, 3), "irrelevant", dtype=object)))


# ---------------------------------------------------------------------- the shuffled-label twin
@pytest.fixture(scope="module")
def antonym_model():
    """A random model with a word-level tokenizer over the antonym task's words: real tokenization."""
    words = sorted({w.strip() for pair in FUNCTIONS["antonym"].pairs for w in pair})
    vocab = ["<bos>", "<pad>", "<unk>", "->", *words]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = random_bridge(n_ctx=32, d_vocab=len(vocab))
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>",
                                              pad_token="<pad>", unk_token="<unk>")
    return model


def _demonstrations(prompt: str) -> tuple[list[tuple[str, str]], str]:
    *lines, query = prompt.split("\n")
    return [tuple(part.strip() for part in line.split("->")) for line in lines], query


def test_shuffled_labels_keep_inputs_query_and_answer_and_move_every_label(antonym_model):
    data = function(antonym_model, n=20, seed=3, function="antonym", corrupt="shuffled_labels")
    twin = data.corrupt
    assert twin is not None and twin.tokens.shape == data.tokens.shape
    assert torch.equal(twin.target_mask, data.target_mask)
    assert twin.meta["corruption"] == "shuffled_labels" and twin.meta["answers"] == data.meta["answers"]
    for clean_prompt, shuffled_prompt in zip(data.meta["prompts"], twin.meta["prompts"], strict=True):
        clean_shots, clean_query = _demonstrations(clean_prompt)
        shuffled_shots, shuffled_query = _demonstrations(shuffled_prompt)
        assert shuffled_query == clean_query
        assert [x for x, _ in shuffled_shots] == [x for x, _ in clean_shots]
        assert sorted(y for _, y in shuffled_shots) == sorted(y for _, y in clean_shots)
        assert all(a != b for (_, a), (_, b) in zip(clean_shots, shuffled_shots, strict=True))
    # The twin is attached without changing the items; make_task passes the option through.
    plain = function(antonym_model, n=20, seed=3, function="antonym")
    assert torch.equal(plain.tokens, data.tokens) and plain.corrupt is None
    again = make_task("function", antonym_model, n=20, seed=3, function="antonym", corrupt="shuffled_labels")
    assert torch.equal(again.corrupt.tokens, twin.tokens)


def test_shuffled_labels_refuse_what_cannot_be_shuffled(antonym_model):
    with pytest.raises(ValueError, match="view='in_context'"):
        function(antonym_model, n=4, function="antonym", view="instruction", corrupt="shuffled_labels")
    with pytest.raises(ValueError, match="n_shots >= 2"):
        function(antonym_model, n=4, function="antonym", n_shots=1, corrupt="shuffled_labels")
    with pytest.raises(ValueError, match="corrupt must be one of"):
        function(antonym_model, n=4, function="antonym", corrupt="reversed")


# ---------------------------------------------------------------------- targeted ablation
@pytest.mark.parametrize("name", ["recall", "repeat"])
def test_targeted_ablation_moves_each_role_in_its_direction(name, request):
    circuit = request.getfixturevalue(name)
    data = circuit.data(64, 7)
    result = result_with_roles(circuit.true_roles())
    frame = targeted_ablation(circuit.model, data, result, n_random=6)
    summary = ablation_summary(frame).set_index(["score", "start", "value"])
    assert summary["as_expected"].tolist() == [True, True, True, True]
    fac = summary.loc[("facilitating", "g_plus", 0.0)]
    irr = summary.loc[("irrelevant", "g_plus", 0.0)]
    rise = summary.loc[("interfering", "ones", 0.0)]
    reopen = summary.loc[("interfering", "g_plus", 1.0)]
    assert fac.delta_logprob < -1.0 and abs(irr.delta_logprob) < 1e-3
    assert rise.delta_logprob > 0.2 and reopen.delta_logprob < -0.2
    # Against random orders of the same start and value: the role curves sit at the band's edge.
    assert fac.delta_logprob <= fac.random_median and rise.delta_logprob >= rise.random_median
    assert fac.random_min <= fac.random_max
    assert fac.k == len(circuit.heads_with_role("facilitating"))
    assert irr.k == len(circuit.heads_with_role("irrelevant"))
    random = frame[frame.score == "random"]
    n_heads = circuit.model.cfg.n_layers * circuit.model.cfg.n_heads
    assert len(random) == 3 * 6 * (n_heads + 1)  # three (start, value) pairs, 6 orders each
    assert random["expected"].isna().all() and set(random["draw"]) == set(range(6))


def test_targeted_ablation_catches_a_taxonomy_with_the_signs_swapped(recall):
    """A result that calls the facilitating head interfering and vice versa fails the sign check."""
    roles = recall.true_roles()
    swapped = np.where(roles == "facilitating", "interfering",
                       np.where(roles == "interfering", "facilitating", roles)).astype(object)
    frame = targeted_ablation(recall.model, recall.data(64, 7), result_with_roles(swapped), n_random=0)
    summary = ablation_summary(frame).set_index(["score", "start", "value"])
    assert not summary.loc[("facilitating", "g_plus", 0.0), "as_expected"]
    assert not summary.loc[("interfering", "ones", 0.0), "as_expected"]
    assert np.isnan(summary.loc[("facilitating", "g_plus", 0.0), "random_min"])  # no random orders drawn


def test_targeted_ablation_refuses_bad_directions_and_frames(recall):
    result = result_with_roles(recall.true_roles())
    data = recall.data(8, 0)
    with pytest.raises(ValueError, match="directions: expected a non-empty list"):
        targeted_ablation(recall.model, data, result, directions=[])
    with pytest.raises(ValueError, match="start: expected 'g_plus' or 'ones'"):
        targeted_ablation(recall.model, data, result, directions=[AblationDirection("irrelevant", "g0", 0.0,
                                                                                    "flat")])
    with pytest.raises(ValueError, match="n_random: expected a non-negative int"):
        targeted_ablation(recall.model, data, result, n_random=-1)
    frame = targeted_ablation(recall.model, data, result, n_random=1)
    with pytest.raises(ValueError, match=r"missing \['role_size'\]"):
        ablation_summary(frame.drop(columns=["role_size"]))


def test_ablation_figure_draws_the_interfering_curve_and_random_bands(recall):
    from chg_tlens.app.plot import ROLE_COLORS, ablation_curves

    frame = targeted_ablation(recall.model, recall.data(16, 0), result_with_roles(recall.true_roles()),
                              n_random=3)
    ax = ablation_curves(frame).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "interfering -> 0 (from full model)" in labels and "interfering -> 1" in labels
    assert len(ax.get_lines()) == 4 + 1  # four role curves and the zero line
    rise = ax.get_lines()[labels.index("interfering -> 0 (from full model)")]
    assert to_hex(rise.get_color()) == ROLE_COLORS["interfering"]
    expected = frame[(frame.score == "interfering") & (frame.start == "ones")].sort_values("n_changed")
    assert np.allclose(rise.get_ydata(), expected.delta_logprob)
    assert len(ax.collections) == 3  # one random band per (start, value)


# ---------------------------------------------------------------------- many sufficient circuits
def test_seed_circuits_counts_and_overlaps_known_sets():
    roles = np.full((4, 2, 3), "irrelevant", dtype=object)
    for seed, heads in enumerate([[(0, 0), (0, 1)], [(0, 0), (1, 2)], [(0, 0)], []]):
        for head in heads:
            roles[(seed, *head)] = "facilitating"
    roles[0, 1, 0] = "interfering"
    roles[3, 1, 0] = "interfering"
    circuits = seed_circuits(result_with_roles(roles))
    assert circuits.sets == [[(0, 0), (0, 1)], [(0, 0), (1, 2)], [(0, 0)], []]
    assert circuits.facilitating_any == [(0, 0), (0, 1), (1, 2)]
    assert circuits.facilitating_every == []  # seed 3 has none
    assert circuits.facilitating_or_interfering_any == [(0, 0), (0, 1), (1, 0), (1, 2)]
    assert circuits.share_facilitating_or_interfering_any == pytest.approx(4 / 6)
    j = circuits.jaccard
    assert [float(j[0, 1]), float(j[0, 2]), float(j[1, 2])] == pytest.approx([1 / 3, 1 / 2, 1 / 2])
    assert j[0, 3] == 0.0 and torch.isnan(j[3, 3])  # an empty set overlaps nothing; two empties: undefined
    assert torch.allclose(j[:3, :3], j[:3, :3].T) and (j.diagonal()[:3] == 1.0).all()
    # Pairs with seed 3: overlap 0 with every non-empty set; the mean counts all six pairs.
    assert circuits.mean_jaccard == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 0 + 0 + 0) / 6)
    counts = circuits.counts()
    assert counts["facilitating_per_seed"] == [2, 2, 1, 0] and counts["facilitating_every"] == 0
    assert seed_circuits(result_with_roles(roles[:3])).facilitating_every == [(0, 0)]
    with pytest.raises(ValueError, match="no sufficiency runs"):
        circuits.per_seed()
    with pytest.raises(ValueError, match="result: expected a CHGResult"):
        seed_circuits(roles)


def test_each_seeds_circuit_suffices_alone_where_two_heads_each_solve_the_task():
    circuit = redundant_circuit()
    roles = np.stack([circuit.true_roles()] * 2)
    roles[0, 1, 2] = "irrelevant"  # seed 0 keeps only 0.1, seed 1 only 1.2: disjoint sufficient sets
    roles[1, 0, 1] = "irrelevant"
    found = sufficient_circuits(circuit.model, circuit.data(64, 2), result_with_roles(roles), n_random=8)
    assert found.sets == [[(0, 1)], [(1, 2)]] and found.facilitating_every == []
    assert found.jaccard[0, 1] == 0.0
    table = found.per_seed()
    assert table["n_heads"].tolist() == [1, 1]
    full = found.sufficiency[found.sufficiency.condition == "full model"].iloc[0]
    none = found.sufficiency[found.sufficiency.condition == "no heads"].iloc[0]
    for row in table.itertuples():
        assert row.accuracy == 1.0 and row.logprob > row.random_logprob + 1.0
        assert row.logprob > none.logprob + 1.0 and row.beats_random_share >= 0.75
    assert full.accuracy == 1.0
    assert len(found.sufficiency) == 2 + 2 * (1 + 8)
