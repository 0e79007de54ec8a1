"""Comparison metrics on hand-made examples, faithfulness on a planted model, the CHG adapter, and the
benchmark models doing what their docstrings claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chg_tlens.analysis import compare, metrics
from chg_tlens.analysis.baselines import HeadScores, one_head_off
from chg_tlens.analysis.validate import evaluate_gates, target_logprob_metric
from chg_tlens.core.config import CHGConfig
from chg_tlens.core.data import GateData
from chg_tlens.core.result import CHGResult
from chg_tlens.errors import InputError
from chg_tlens.testbeds.benchmark_models import (
    induction_circuit,
    interfering_circuit,
    redundant_circuit,
    trained_induction,
)

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


# ------------------------------------------------------------------------------ rank statistics
def test_average_ranks_share_ties():
    assert metrics.average_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_spearman_on_hand_made_examples():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert metrics.spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)
    # ranks of b: 1, 2, 3.5, 5, 3.5 -> sum of products 8, sums of squares 10 and 9.5
    b = np.array([5.0, 6.0, 7.0, 8.0, 7.0])
    assert metrics.spearman(np.arange(1.0, 6.0), b) == pytest.approx(8 / np.sqrt(95))
    assert np.isnan(metrics.spearman(a, np.ones((2, 2))))


def test_roc_auc_on_hand_made_examples():
    positives = np.array([True, False, True, False])
    # pairs (pos, neg): 0.9>0.8, 0.9>0.1, 0.7<0.8, 0.7>0.1 -> 3 of 4
    assert metrics.roc_auc(np.array([0.9, 0.8, 0.7, 0.1]), positives) == pytest.approx(0.75)
    # a tie between a positive and a negative counts half
    assert metrics.roc_auc(np.array([1.0, 1.0, 0.0]), np.array([True, False, False])) == pytest.approx(0.75)
    assert metrics.roc_auc(torch.tensor([[0.0, 2.0], [1.0, 3.0]]),
                           torch.tensor([[False, True], [False, True]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one positive and one negative"):
        metrics.roc_auc(np.array([1.0, 2.0]), np.array([True, True]))
    with pytest.raises(InputError, match="boolean"):
        metrics.roc_auc(np.array([1.0, 2.0]), np.array([1, 0]))


def test_precision_at_k_on_hand_made_examples():
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    positives = np.array([True, False, True, False])
    assert metrics.precision_at_k(scores, positives, 1) == pytest.approx(1.0)
    assert metrics.precision_at_k(scores, positives, 2) == pytest.approx(0.5)
    assert metrics.precision_at_k(scores, positives) == pytest.approx(0.5)  # k = number of positives
    assert metrics.precision_at_k(scores, positives, 3) == pytest.approx(2 / 3)
    # three heads tie for one place, one of them positive: a third of a hit
    tied = np.array([1.0, 1.0, 1.0, 0.0])
    assert metrics.precision_at_k(tied, np.array([True, False, False, False]), 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k must be"):
        metrics.precision_at_k(scores, positives, 5)


def test_top_k_heads_and_overlap():
    a = torch.tensor([[3.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [2.0, 1.0]])
    assert metrics.top_k_heads(a, 2) == [(0, 0), (0, 1)]
    assert metrics.top_k_heads(b, 2) == [(0, 0), (1, 0)]
    assert metrics.top_k_overlap(a, b, 2) == pytest.approx(0.5)
    assert metrics.top_k_overlap(a, b, 4) == pytest.approx(1.0)
    assert metrics.top_k_overlap(HeadScores(a, "a"), HeadScores(a, "a"), 1) == pytest.approx(1.0)


def test_truth_metrics_and_agreement_table():
    roles = np.array([["facilitating", "interfering"], ["irrelevant", "irrelevant"]], dtype=object)
    perfect = HeadScores(torch.tensor([[1.0, -1.0], [0.0, 0.0]]), "perfect")
    backwards = HeadScores(-perfect.scores, "backwards")
    assert metrics.truth_metrics(perfect, roles) == {"auc": 1.0, "precision_at_k": 1.0, "n_positive": 1}
    assert metrics.truth_metrics(backwards, roles)["auc"] == pytest.approx(0.0)
    assert metrics.truth_metrics(backwards, roles, positive_role="interfering")["auc"] == pytest.approx(1.0)
    table = metrics.method_agreement([perfect, backwards], k=1)
    assert table.loc[0, "spearman"] == pytest.approx(-1.0) and table.loc[0, "top_k_overlap"] == 0.0


# ------------------------------------------------------------------------------ faithfulness and CHG
def test_faithfulness_curve_on_a_planted_model(recall_with_twin):
    circuit, data = recall_with_twin
    truth_order = torch.tensor([[3.0, 0.0, 2.0, 1.0]])  # facilitating first, interfering last
    curve = compare.faithfulness_curve(circuit.model, data, truth_order)
    assert curve["k"].tolist() == [0, 1, 2, 3, 4]
    assert curve["faithfulness"].iloc[0] == pytest.approx(0.0, abs=1e-6)
    assert curve["faithfulness"].iloc[-1] == pytest.approx(1.0, abs=1e-6)
    # the facilitating head alone beats the full model, which carries the interfering head
    assert curve["faithfulness"].iloc[1] > 1.1 and curve["accuracy"].iloc[1] == 1.0
    worst_first = compare.faithfulness_curve(circuit.model, data, -truth_order, ks=[1])
    assert worst_first["faithfulness"].iloc[0] < 0
    with pytest.raises(ValueError, match="scores hold 3 heads"):
        compare.faithfulness_curve(circuit.model, data, torch.zeros(1, 3))


def test_chg_adapter_scores_facilitation_and_counts_its_cost(recall_with_twin):
    circuit, data = recall_with_twin
    config = CHGConfig(n_seeds=2, steps=60, batch_size=16, progress=False)
    (by_max, by_mean), result = compare.run_chg(circuit.model, data, config)
    assert by_max.method == "chg_max" and by_mean.method == "chg_mean"
    assert torch.equal(by_max.scores, result.facilitating.max(dim=0).values)
    assert torch.allclose(by_mean.scores, result.facilitating.mean(dim=0))
    assert divmod(int(by_max.scores.argmax()), 4) == (0, 0)
    # 60 updates of 16 examples per stage for 2 seeds, and each stage's full-data certificate gradient.
    assert by_max.forward_passes == 3 * 60 * 16 * 2 + 3 * len(data) * 2
    with pytest.raises(ValueError, match="reduce"):
        compare.chg_head_scores(result, "median")


def test_saved_chg_fits_are_scored_as_fitted_and_refused_on_other_data(recall_with_twin, tmp_path):
    circuit, data = recall_with_twin
    short = CHGConfig(n_seeds=1, steps=5, batch_size=8, progress=False)
    (fresh, _), result = compare.run_chg(circuit.model, data, CHGConfig(n_seeds=2, steps=60, batch_size=16,
                                                                        progress=False))
    _, other = compare.run_chg(circuit.model, data, short)
    saved = CHGResult.load(result.save(tmp_path / "fit"))
    settings = compare.MethodSettings(chg_fits=(saved,))
    (by_max, by_mean), _ = compare.run_methods(circuit.model, data, ["chg"], settings)
    assert by_max.method == "chg_max" and torch.equal(by_max.scores, fresh.scores)
    assert by_max.forward_passes == fresh.forward_passes and by_mean.method == "chg_mean"
    two = compare.MethodSettings(chg_fits=(saved, other))
    names = [item.method for item in compare.run_methods(circuit.model, data, ["chg"], two)[0]]
    assert names == ["chg_max (60 x 16, 2 seeds)", "chg_mean (60 x 16, 2 seeds)",
                     "chg_max (5 x 8, 1 seed)", "chg_mean (5 x 8, 1 seed)"]
    with pytest.raises(ValueError, match="made on other data"):
        compare.run_methods(circuit.model, circuit.data(48, 1), ["chg"], settings)


def test_a_stopped_comparison_continues_from_its_cache(tmp_path, monkeypatch):
    circuit = redundant_circuit()
    benchmark = compare.Benchmark("redundant", circuit.model, circuit.data(32, 0), circuit.data(32, 1),
                                  circuit.true_roles(), 2, compare.MethodSettings())
    methods = ["hisp", "ablation_zero", "random"]
    first, _ = compare.compare_methods([benchmark], methods, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.pt"))) == 3

    def refuse(*args, **kwargs):
        raise AssertionError("a cached method ran again")

    monkeypatch.setitem(compare.METHODS, "hisp", (refuse, False))
    monkeypatch.setitem(compare.METHODS, "ablation_zero", (refuse, False))
    again, _ = compare.compare_methods([benchmark], methods, cache_dir=tmp_path)
    columns = ["method", "auc", "faithfulness_at_k", "forward_passes"]
    assert again[columns].equals(first[columns])
    other = compare.Benchmark("redundant", circuit.model, circuit.data(32, 0), circuit.data(32, 1),
                              circuit.true_roles(), 2, compare.MethodSettings(random_seed=1))
    compare.compare_methods([other], ["random"], cache_dir=tmp_path)  # other settings: a new entry
    assert len(list(tmp_path.rglob("random-*.pt"))) == 2
    with pytest.raises(AssertionError, match="ran again"):
        compare.compare_methods([benchmark], ["hisp"], cache_dir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="telepathy"):  # refused before the methods ahead of it run
        compare.compare_methods([benchmark], ["random", "telepathy"], cache_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_acdc_in_a_cached_comparison_keeps_its_checkpoint_beside_the_cache(recall_with_twin, tmp_path):
    """A sweep stopped mid-way (hours on a real model) continues from the file its cache entry names."""
    circuit, data = recall_with_twin
    settings = compare.MethodSettings(acdc_taus=(0.1,))
    benchmark = compare.Benchmark("recall", circuit.model, data, data, circuit.true_roles(), 1, settings)
    frame, _ = compare.compare_methods([benchmark], ["acdc", "eap_ig"], cache_dir=tmp_path)
    assert frame.set_index("method")["auc_sweep"].notna().to_dict() == {"acdc": True, "eap_ig": False}
    (cached,) = tmp_path.rglob("acdc-*.pt")
    checkpoint = cached.with_suffix(".checkpoint.json")
    assert checkpoint.is_file() and checkpoint.read_text().count('"measured"') == 1
    with_path = compare.MethodSettings(acdc_taus=(0.1,), acdc_checkpoint="anywhere.json")
    elsewhere = compare.Benchmark("recall", circuit.model, data, data, circuit.true_roles(), 1, with_path)
    assert compare._cache_folder(tmp_path, elsewhere)("acdc") == cached  # the path is not in the key


def test_run_methods_skips_patching_without_a_corrupt_twin(recall_with_twin):
    circuit, data = recall_with_twin
    clean_only = GateData.from_tokens(data.tokens, data.target_mask)
    names = ["gradient_importance", "activation_patching_denoise", "attribution_patching", "eap_ig", "acdc",
             "random"]  # gradient_importance: the old name of hisp
    scored, skipped = compare.run_methods(circuit.model, clean_only, names)
    assert [s.method for s in scored] == ["hisp", "random"]
    assert set(skipped) == {"activation_patching_denoise", "attribution_patching", "eap_ig", "acdc"}
    zero_acdc = compare.MethodSettings(acdc_ablation="zero", acdc_taus=(0.1,))
    scored, skipped = compare.run_methods(circuit.model, clean_only, ["acdc"], zero_acdc)
    assert [s.method for s in scored] == ["acdc"] and not skipped  # zero ablation needs no twin
    with pytest.raises(ValueError, match="unknown method"):
        compare.run_methods(circuit.model, data, ["telepathy"])


# ------------------------------------------------------------------------------ benchmark models
def _one_off_and_pairs(circuit, data, pairs=()):
    """Log-prob and accuracy: all heads, each head off alone, then each listed set of heads off."""
    n_layers, n_heads = circuit.model.cfg.n_layers, circuit.model.cfg.n_heads
    settings = [torch.ones(1, n_layers, n_heads), one_head_off(n_layers, n_heads)]
    for heads in pairs:
        gates = torch.ones(1, n_layers, n_heads)
        for layer, head in heads:
            gates[0, layer, head] = 0.0
        settings.append(gates)
    logprob, accuracy = evaluate_gates(circuit.model, data, torch.cat(settings))
    n = n_layers * n_heads
    return (logprob[0], logprob[1 : 1 + n].reshape(n_layers, n_heads), logprob[1 + n :],
            accuracy[0], accuracy[1 : 1 + n].reshape(n_layers, n_heads), accuracy[1 + n :])


def test_redundant_heads_each_suffice_and_together_are_necessary():
    circuit = redundant_circuit()
    data = circuit.data(64, 0)
    first, second = circuit.heads_with_role("facilitating")
    full, one_off, both_off, full_acc, one_off_acc, both_off_acc = _one_off_and_pairs(
        circuit, data, [(first, second)])
    assert full_acc == 1.0
    assert one_off_acc[first] == 1.0 and one_off_acc[second] == 1.0
    assert one_off[first] > -0.2 and one_off[second] > -0.2
    assert both_off_acc[0] < 0.3 and both_off[0] < -1.5


def test_interfering_circuit_distractor_hurts_and_weak_helper_helps():
    circuit = interfering_circuit()
    data = circuit.data(64, 0)
    full, one_off, _, full_acc, one_off_acc, _ = _one_off_and_pairs(circuit, data)
    distractor, weak_helper, main = (0, 1), (0, 2), (1, 0)
    assert circuit.true_roles()[distractor] == "interfering"
    assert full_acc == 1.0 and one_off_acc[main] < 0.3
    assert one_off[distractor] > full  # removing it helps
    assert one_off[weak_helper] < full  # removing it hurts
    assert (data.tokens[:, 2] != data.tokens[:, 1]).all()  # the distractor is never the answer
    assert (data.corrupt.tokens[:, 1] != data.tokens[:, 1]).all()


def test_induction_circuit_needs_both_heads_and_no_fixed_offset_solves_it():
    circuit = induction_circuit()
    data = circuit.data(64, 0)
    full, one_off, _, full_acc, one_off_acc, _ = _one_off_and_pairs(circuit, data)
    previous_token, induction, copy_current = (0, 0), (1, 1), (1, 2)
    assert full_acc == 1.0
    assert one_off_acc[previous_token] < 0.3 and one_off_acc[induction] < 0.3
    assert one_off[copy_current] > full
    assert len(set(data.lengths.tolist())) > 1  # block lengths vary, so offsets differ per example
    metric = target_logprob_metric(data)  # the clean answers, whatever the input
    with torch.no_grad():
        on_twin = float(metric(circuit.model(data.corrupt.tokens)))
    assert on_twin < float(full) - 1.0  # the twin's first block no longer predicts the repeat


def test_recall_benchmark_twin_changes_the_answer(recall_with_twin):
    circuit, data = recall_with_twin
    assert (data.corrupt.tokens[:, 1] != data.tokens[:, 1]).all()
    assert torch.equal(data.corrupt.tokens[:, -1], data.corrupt.tokens[:, 1])
    assert (circuit.true_roles() == np.array([["facilitating", "interfering", "irrelevant",
                                               "irrelevant"]], dtype=object)).all()


def test_trained_model_learns_induction_and_its_labelled_heads_carry_the_task():
    circuit = trained_induction(seed=0)
    roles = circuit.true_roles()
    facilitating = torch.as_tensor(roles == "facilitating")
    scores = circuit.diagnostics
    assert facilitating[0].any() and facilitating[1].any()  # previous-token in 0, induction in 1
    assert scores["previous_token_score"][0].max() > 0.5
    assert scores["induction_score"][1].max() > 0.5
    data = circuit.data(128, 0)
    keep_only = facilitating.float()[None]
    settings = torch.cat([torch.ones(1, 2, 4), keep_only, 1.0 - keep_only])
    _, accuracy = evaluate_gates(circuit.model, data, settings)
    full, only_labelled, without_labelled = accuracy.tolist()
    assert full > 0.7
    assert only_labelled > full - 0.05
    assert without_labelled < 0.2


def test_a_method_whose_published_form_replaced_an_older_one_does_not_read_the_older_cache(tmp_path,
                                                                                        monkeypatch):
    """Rejects a cache key without the method's version: scores of un-normalised HISP (or the left EAP-IG
    sum) cached before the change would be read back as the published form."""
    circuit = redundant_circuit()
    benchmark = compare.Benchmark("redundant", circuit.model, circuit.data(8, 0), circuit.data(8, 1),
                                  circuit.true_roles(), 2, compare.MethodSettings())
    cache = compare._cache_folder(tmp_path, benchmark)
    before = {name: cache(name) for name in ("hisp", "random")}
    monkeypatch.setitem(compare.METHOD_VERSIONS, "hisp", compare.METHOD_VERSIONS["hisp"] + 1)
    cache = compare._cache_folder(tmp_path, benchmark)
    assert cache("hisp") != before["hisp"]
    assert cache("random") == before["random"]  # methods whose form did not change keep their caches
    monkeypatch.setitem(compare.METHOD_VERSIONS, "random", 1)
    assert compare._cache_folder(tmp_path, benchmark)("random") == before["random"]  # version 1: old key
