"""Symbol heads (Yang et al., 2025) on a planted ABA/ABB circuit whose symbolic heads are known, the
paired contexts they are scored on, and the CHG mediation check over them."""

from __future__ import annotations

import pytest
import torch

from chg_tlens import CHGResult
from chg_tlens.analysis.accuracy import task_accuracy
from chg_tlens.analysis.mediation import mediation_test
from chg_tlens.analysis.symbols import HEAD_TYPES, symbol_heads, symbol_task_accuracy
from chg_tlens.errors import InputError
from chg_tlens.tasks.aba_abb import PairedContexts, aba_abb, paired_contexts
from chg_tlens.testbeds import surgery
from chg_tlens.testbeds.symbolic import symbolic_circuit

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

STRENGTH, COPY = 5.0, 1.5


@pytest.fixture(scope="module")
def circuit():
    return symbolic_circuit(strength=STRENGTH, copy=COPY)


@pytest.fixture(scope="module")
def found(circuit):
    return symbol_heads(circuit.model, n=8, n_shots=2, top_k=2, progress=False)


def test_the_planted_model_does_the_task_on_both_rules(circuit):
    for rule in ("aba", "abb"):
        data = aba_abb(circuit.model, n=8, seed=1, rule=rule, n_shots=3)
        assert task_accuracy(circuit.model, data)["accuracy"] == 1.0
    assert task_accuracy(circuit.model, circuit.data(8, 0))["contrast_accuracy"] == 1.0


def test_abstract_pairs_flip_the_rule_but_keep_third_words_and_answers(circuit):
    pairs = paired_contexts(circuit.model, n=6, seed=2, kind="abstract", n_shots=2)
    source, target = pairs.source, pairs.target
    assert pairs.rules == ["aba", "abb"] * 3  # "both" alternates the source rule
    assert target.meta["rules"] == ["abb", "aba"] * 3
    assert pairs.item_positions[0].nonzero().flatten().tolist() == [3, 7]  # BOS, then 4 tokens a line
    assert pairs.final_positions[0].nonzero().flatten().tolist() == [10]
    items = pairs.item_positions
    assert torch.equal(source.tokens[items], target.tokens[items])  # the same literal third words
    assert not torch.equal(source.tokens, target.tokens)
    assert torch.equal(source.labels(), target.labels())  # and the same answer
    assert (target.corrupt.labels() != target.labels()).all()  # y*: the query's other word
    for i, rule in enumerate(pairs.rules[:2]):
        a, b, third = source.meta["prompts"][i].split("\n")[0].split()
        assert third == (a if rule == "aba" else b)
        assert target.meta["prompts"][i].split("\n")[0].split() == [b, a, third]  # first two swapped


def test_token_pairs_keep_the_rule_and_swap_only_the_query(circuit):
    pairs = paired_contexts(circuit.model, n=6, seed=2, kind="token", n_shots=2)
    source, target = pairs.source, pairs.target
    query = pairs.final_positions.nonzero()[:, 1]
    rows = torch.arange(6)
    assert torch.equal(source.tokens[:, :9], target.tokens[:, :9])  # BOS and both example lines
    assert torch.equal(source.tokens[rows, query - 1], target.tokens[rows, query])
    assert torch.equal(target.corrupt.labels(), source.labels())  # y*: the source's literal answer


def test_each_planted_head_tops_the_ranking_of_its_own_contrast_only(circuit, found):
    """0.0 abstracts, 1.0 induces, 2.0 retrieves: each scores 2 x strength on its own contrast (the
    target's answer flips from -strength to +strength) and nothing on the other two."""
    planted = circuit.extra["heads"]
    assert found.n_pairs == found.n_candidates == {"abstract": 8, "token": 8}
    assert found.baseline == pytest.approx({"abstract": -STRENGTH, "token": -STRENGTH}, abs=1e-3)
    for head_type, scores in found.scores.items():
        assert found.heads[head_type][0] == planted[head_type]
        expected = torch.zeros(3, 4)
        expected[planted[head_type]] = 2 * STRENGTH
        torch.testing.assert_close(scores, expected, atol=1e-3, rtol=0)
    for layer, head in circuit.extra["literal_heads"]:  # the literal copiers carry no abstract variable
        assert abs(found.scores["symbol_abstraction"][layer, head]) < 1e-3
        assert abs(found.scores["symbolic_induction"][layer, head]) < 1e-3
    frame = found.to_frame()
    assert list(frame.columns[:4]) == ["layer", "head", "symbol_abstraction", "symbol_abstraction_top"]
    assert int(frame["retrieval_top"].sum()) == 2
    # the filter's two runs per pair; per kind a source and a target run, then one per head and type
    assert found.forward_passes == 2 * 16 + 8 * (2 + 2 * 12) + 8 * (2 + 12)
    assert found.seconds > 0


def test_one_source_rule_lets_a_literal_copier_pose_as_symbolic_induction(circuit):
    """With only ABA sources, the head copying the last word (2.1) carries the source's last word, which
    is y*: it scores 2 x copy on the abstract contrast without knowing any rule. ``rule="both"`` is what
    cancels it; the planted symbolic heads stay on top either way."""
    aba = symbol_heads(circuit.model, n=6, n_shots=2, rule="aba", top_k=2, progress=False)
    assert aba.scores["symbolic_induction"][2, 1] == pytest.approx(2 * COPY, abs=1e-2)
    assert aba.scores["retrieval"][2, 1] == pytest.approx(-2 * COPY, abs=1e-2)
    assert aba.heads["symbolic_induction"] == [(1, 0), (2, 1)]
    assert aba.heads["retrieval"][0] == (2, 0)


def test_only_correct_keeps_the_pairs_the_model_answers_in_both_contexts():
    """Without its retrieval head the model answers by copying the last word: right on ABB, wrong on
    ABA. Every abstract pair has one ABA side, token pairs with an ABB source keep both sides ABB."""
    broken = symbolic_circuit(strength=STRENGTH, copy=COPY)
    blank = torch.zeros(broken.model.cfg.d_model, broken.model.cfg.d_head)
    surgery.write_head_weights(broken.model, 2, 0, blank, blank, blank, blank.T)
    accuracy = symbol_task_accuracy(broken.model, n=8, n_shots=2)
    assert accuracy["abstract"]["pairs_correct"] == 0.0 and accuracy["token"]["pairs_correct"] == 0.5
    assert accuracy["token"]["source"]["accuracy"] == 0.5
    with pytest.raises(InputError, match="only_correct: the model answers none of the 8 abstract pairs"):
        symbol_heads(broken.model, n=8, n_shots=2, progress=False)
    retrieval = symbol_heads(broken.model, head_types=["retrieval"], n=8, n_shots=2, progress=False)
    assert retrieval.n_pairs == {"token": 4} and retrieval.n_candidates == {"token": 8}
    assert set(retrieval.contexts["token"].rules) == {"abb"}
    everything = symbol_heads(broken.model, n=8, n_shots=2, only_correct=False, progress=False)
    assert everything.n_pairs == {"abstract": 8, "token": 8}


def test_mediation_test_compares_facilitation_of_the_symbol_heads_with_the_rest(circuit, found):
    minus = torch.linspace(-4.0, -3.0, 24).view(2, 3, 4)  # G- logits; facilitation is their sigmoid
    for layer, head in circuit.extra["heads"].values():
        minus[1, layer, head] = 4.0 - layer / 4  # facilitating in one seed: the max over seeds sees it
    minus[0, 0, 1] = 0.0  # 0.1, a second-ranked head, halfway
    result = CHGResult(torch.zeros_like(minus), torch.zeros_like(minus), minus)
    tests = found.mediation_test(result)
    assert set(tests) == {*HEAD_TYPES, "any"}
    assert tests["any"] == mediation_test(result, found.flags())
    assert tests["any"]["t"] > 2 and tests["any"]["n_flagged"] == int(found.flags().sum())
    for head_type in HEAD_TYPES:
        assert tests[head_type]["n_flagged"] == 2 and tests[head_type]["spearman_rho"] > 0
    top_only = symbol_heads(circuit.model, n=4, n_shots=2, top_k=1, progress=False).mediation_test(result)
    assert top_only["retrieval"]["t"] is None and top_only["retrieval"]["spearman_rho"] > 0
    assert top_only["any"]["n_flagged"] == 3 and top_only["any"]["t"] > 10
    with pytest.raises(InputError, match=r"result: gates are \[layer, head\] = \[1, 4\]"):
        found.mediation_test(CHGResult(*(torch.zeros(1, 1, 4),) * 3))


def test_bad_input_is_refused_by_name(circuit, found):
    model = circuit.model
    with pytest.raises(InputError, match="head_types: expected some of"):
        symbol_heads(model, head_types=["induction"], progress=False)
    with pytest.raises(InputError, match="kind must be one of"):
        paired_contexts(model, kind="literal")
    with pytest.raises(InputError, match="rule must be one of"):
        paired_contexts(model, rule="mixed")
    with pytest.raises(InputError, match=r"contexts\['token'\]: expected PairedContexts of kind 'token'"):
        symbol_heads(model, {"token": found.contexts["abstract"]}, head_types=["retrieval"], progress=False)
    pairs = found.contexts["abstract"]
    with pytest.raises(InputError, match="same token layout"):
        PairedContexts("abstract", pairs.source, pairs.target.subset([0, 1]), pairs.item_positions)
    with pytest.raises(InputError, match="item_positions: every pair needs"):
        PairedContexts("abstract", pairs.source, pairs.target, torch.zeros_like(pairs.item_positions))
