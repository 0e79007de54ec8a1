"""Circuits (``chg_tlens.circuit``) on a model whose wiring is known, edge by edge and input by input.

``testbeds/wiring.py`` plants one edge through a key (previous-token 0.0 -> induction 1.0), one through
a query (0.2 -> 1.1), one through a value (0.1 -> mover 2.0), four edges to the logits and a loud head
(0.3) whose output nothing reads: every other measured edge is exactly zero. Each test names, in a
comment, the plausible wrong implementation it rejects.

The browser test needs Debian's ``chromium`` (as ``test_report.py``); without it the test fails.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from models_for_tests import random_bridge, random_twins, with_a_key_value_head_per_query_head
from PIL import Image
from test_report import chromium, console_lines

from chg_tlens import CHGConfig, fit_chg
from chg_tlens.analysis.circuit import CIRCUIT_FILE, CIRCUIT_HTML, LOGITS, Circuit, circuit, head_name
from chg_tlens.analysis.circuit_html import POSITIVE
from chg_tlens.analysis.patching import logit_diff_metric, path_patching
from chg_tlens.analysis.statistics import resample_indices
from chg_tlens.app.cli import EXIT_OK, EXIT_USAGE, build_parser, main
from chg_tlens.app.runs import write_run_folder
from chg_tlens.core.result import CHGResult
from chg_tlens.core.result_files import ResultFileError
from chg_tlens.errors import InputError
from chg_tlens.testbeds.benchmark_models import induction_circuit
from chg_tlens.testbeds.composite import composite_circuit
from chg_tlens.testbeds.wiring import (
    AGAINST,
    FINDER,
    FLAG,
    INDUCTION,
    MOVER,
    PREVIOUS,
    SIDE,
    UNREAD,
    WIRED_EDGES,
    wired_circuit,
)

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

NODES = [PREVIOUS, SIDE, FLAG, UNREAD, INDUCTION, FINDER, MOVER, AGAINST]
"""Every head of the wired model that does anything (the other four are empty)."""
QUICK = {"threshold": 0.01, "n_boot": 200}
"""Non-edges are exactly zero here, so any small threshold separates them; few resamples keep it fast."""


@pytest.fixture(scope="module")
def wired():
    return wired_circuit()


@pytest.fixture(scope="module")
def composite():
    return composite_circuit()


@pytest.fixture(scope="module")
def wired_found(wired):
    """The fast circuit of the wired model's heads on its data (seed 0), and that data."""
    data = wired.data(64, 0)
    return circuit(wired.model, data, NODES, **QUICK), data


def kept_edges(found: Circuit) -> set[tuple]:
    return {(edge.sender, edge.receiver, edge.input) for edge in found.kept_edges()}


def without_twin(data):
    return dataclasses.replace(data, corrupt=None)


# ------------------------------------------------------------------------------------------ edges
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovered_edges_are_the_planted_ones_through_the_right_input(wired, seed):
    # Rejects edges read through the wrong input (the key recorded where the query is asked for, or one
    # recording reused for all three kinds): 0.0 -> 1.0 would land on q or v, 0.2 -> 1.1 on k or v.
    found = circuit(wired.model, wired.data(64, seed), NODES, **QUICK)
    assert found.counterfactual == "corrupt" and found.carry == "direct exact, indirect first order"
    assert kept_edges(found) == set(WIRED_EDGES)
    for edge in found.kept_edges():  # each planted edge is clear of zero over prompts
        assert edge.low <= edge.effect <= edge.high
        assert (edge.low > 0) if edge.sender != AGAINST else (edge.high < 0)


def test_the_unread_head_gets_no_edge_though_its_output_changes(wired, wired_found):
    # Rejects a direct-logit edge read off the size of what a sender writes (0.3 writes a loud sink) or
    # off its change alone, instead of the metric through the unembedding: 0.3 would get an edge.
    found, data = wired_found
    with torch.no_grad():
        _, clean = wired.model.run_with_cache(data.tokens, names_filter="blocks.0.attn.hook_z")
        _, corrupt = wired.model.run_with_cache(data.corrupt.tokens, names_filter="blocks.0.attn.hook_z")
    name = "blocks.0.attn.hook_z"
    moved = clean[name][:, :, UNREAD[1]] - corrupt[name][:, :, UNREAD[1]]
    assert moved.abs().max() > 0.9  # 0.3 does change between clean and corrupt, ...
    unread = [edge for edge in found.edges if edge.sender == UNREAD]
    assert len(unread) == 4 * 3 + 1  # ... every edge of it was measured, ...
    assert all(abs(e.effect) < 1e-6 and e.low == e.high == e.effect and not e.kept for e in unread)
    assert abs(found.node_info[UNREAD]["ablation_effect"]) < 1e-6  # ... and it matters for nothing


def test_edges_run_forward_only_and_every_pair_is_measured_once(wired_found):
    # Rejects a receiver before or beside its sender (pairs taken as layer >= the sender's, or every
    # ordered pair): same-layer or backward edges appear and the count is off.
    found, _ = wired_found
    keys = [(e.sender, e.receiver, e.input) for e in found.edges]
    assert len(keys) == len(set(keys))
    expected = {(s, r, kind) for s in NODES for r in NODES if r[0] > s[0] for kind in "qkv"}
    expected |= {(s, LOGITS, LOGITS) for s in NODES}
    assert set(keys) == expected
    assert all(e.receiver == LOGITS or e.receiver[0] > e.sender[0] for e in found.edges)
    assert all(e.kept for e in found.prune(0.0).edges) and not found.prune(1.0).kept_edges()


GROUPED = dict(n_layers=3, n_heads=4, n_key_value_heads=2, seed=3)
"""A random model with norms and MLPs whose 4 query heads per layer share 2 key/value heads (0-1, 2-3)."""


@pytest.mark.parametrize("exact", [True, False])
def test_grouped_query_edges_equal_those_of_the_model_with_a_key_value_head_per_query_head(exact):
    """A receiver's key/value edge on a grouped-query model is its own: the same numbers as on the same
    function written with one key/value head per query head. Rejects patching the shared key/value head
    without holding the heads that share it (1.0 shares 1.1's and is no node), and reading head h's
    key/value head as h % n_kv instead of h // group."""
    grouped, twins = random_bridge(**GROUPED), random_twins()
    copied = with_a_key_value_head_per_query_head(grouped, **GROUPED)
    with torch.no_grad():
        torch.testing.assert_close(grouped(twins.tokens), copied(twins.tokens), atol=1e-5, rtol=0)
    nodes = [(0, 0), (0, 3), (1, 1), (2, 0), (2, 1)]  # 2.0 and 2.1 share a key/value head, both receive
    found, reference = (circuit(model, twins, nodes, exact=exact, n_boot=20).to_frame()
                        for model in (grouped, copied))
    assert set(found.input) == {"q", "k", "v", LOGITS}
    for kind in ("k", "v"):  # the edges carry something to get wrong
        assert found[found.input == kind].effect.abs().max() > 1e-3
    np.testing.assert_allclose(found.effect.to_numpy(), reference.effect.to_numpy(), atol=1e-6, rtol=1e-4)
    if not exact:  # the circuit kept alone: 2.0 and 2.1 share a key/value head but keep different edges
        into_last = found[found.receiver.isin(["L2H0", "L2H1"])]
        strongest = into_last.loc[into_last.effect.abs().idxmax()]
        total = circuit(grouped, twins, nodes, n_boot=20).total_effect
        share = 0.999 * abs(strongest.effect) / abs(total)
        graphs = [circuit(model, twins, nodes, n_boot=20, threshold=share) for model in (grouped, copied)]
        kept_into_last = [e for e in graphs[0].kept_edges() if e.receiver in ((2, 0), (2, 1))]
        assert len(kept_into_last) == 1  # so the two share a key/value head but not their cut senders
        own, copy = (graph.ablate(model, twins, n_random=2) for graph, model in zip(graphs, (grouped, copied),
                                                                                    strict=True))
        assert own.circuit == pytest.approx(copy.circuit, abs=1e-5)
        assert own.nodes_only == pytest.approx(copy.nodes_only, abs=1e-5)
    if exact:  # path patching itself, with one receiver and with two sharing a key/value head
        for receivers in ([(1, 1)], [(2, 0), (2, 1)]):
            own, copy = (path_patching(model, twins, None, [(0, 0)], receivers, receiver_input="k")
                         for model in (grouped, copied))
            assert own.patched == pytest.approx(copy.patched, abs=1e-6)
            assert abs(own.patched - own.clean) > 1e-4
        with pytest.raises(InputError, match="one layer"):  # a later partner would see the earlier change
            path_patching(grouped, twins, None, [(0, 0)], [(1, 1), (2, 0)], receiver_input="v")


def test_ablate_gives_each_head_sharing_a_key_value_head_its_own_input():
    """Two nodes of one layer sharing a key/value head, one keeping an edge into its key that the other
    cuts, both reaching the logits: the circuit kept alone scores as on the per-head key/value copy.
    Rejects computing such nodes in one pass (the shared key/value head can hold only one of the two
    inputs), which the test above cannot see (its conflicting node has no logit edge kept)."""
    grouped, twins = random_bridge(**GROUPED), random_twins()
    copied = with_a_key_value_head_per_query_head(grouped, **GROUPED)
    nodes = [(0, 0), (0, 3), (2, 0), (2, 1)]  # 2.0 and 2.1 share key/value head 0
    scores = []
    for model in (grouped, copied):
        graph = circuit(model, twins, nodes, n_boot=20)
        conflict = {((0, 0), (2, 1), "k"), ((0, 3), (2, 0), "k")}  # cut; every other edge kept
        graph.edges = [dataclasses.replace(e, kept=(e.sender, e.receiver, e.input) not in conflict)
                       for e in graph.edges]
        scores.append(graph.ablate(model, twins, n_random=1))
    own, copy = scores
    assert own.circuit == pytest.approx(copy.circuit, abs=1e-5)
    # the cuts matter: with both keys' edges kept the score moves (so a pass that gives 2.0's key input
    # to 2.1 as well would be seen)
    assert abs(own.circuit - own.nodes_only) > 1e-3


@pytest.mark.parametrize("name", ["wiring", "composite", "induction"])
def test_fast_edges_equal_exact_path_patching_on_the_planted_models(name, wired, composite):
    # Rejects carrying a receiver's change to the metric to first order (the gradient at the receiver's
    # output times its change, without the exact direct path): the log-softmax makes that miss path
    # patching by 39-89% on these edges, not by 1e-5. (First order at the receiver's *input*, as EAP does,
    # is worse still: the saturated attention gives 0 for the key and query edges.)
    planted = {"wiring": wired, "composite": composite}.get(name) or induction_circuit()
    data = planted.data(48, 0)
    nodes = NODES if name == "wiring" else sorted(planted.heads_with_role("facilitating")
                                                  + planted.heads_with_role("interfering"))
    fast = circuit(planted.model, data, nodes, **QUICK)
    exact = circuit(planted.model, data, nodes, exact=True, **QUICK)
    assert fast.carry != "exact" and exact.carry == "exact"
    a, b = fast.to_frame(), exact.to_frame()
    pd.testing.assert_frame_equal(a.drop(columns=["effect", "low", "high"]), b.drop(columns=["effect", "low",
                                                                                               "high"]))
    np.testing.assert_allclose(a[["effect", "low", "high"]], b[["effect", "low", "high"]], atol=2e-5)
    assert b["effect"].abs().max() > 0.5  # the comparison is not between zeros


def test_exact_edges_are_path_patching_itself_with_any_metric(wired):
    # Rejects a per-example reading of a scalar metric that forgets it is a mean over prompts (every
    # effect shrinks by the number of prompts): exact edges must be path_patching's own numbers.
    data = wired.data(32, 1)
    for metric in ("logprob", logit_diff_metric(data, data.corrupt)):
        found = circuit(wired.model, data, NODES, exact=True, metric=metric, **QUICK)
        effects = {(e.sender, e.receiver, e.input): e.effect for e in found.edges}
        scalar = None if metric == "logprob" else metric
        for sender, receiver, kind in [*WIRED_EDGES[:3], (INDUCTION, LOGITS, LOGITS), (UNREAD, MOVER, "v")]:
            reference = path_patching(wired.model, data, None, [sender],
                                      LOGITS if receiver == LOGITS else [receiver], metric=scalar,
                                      receiver_input="v" if kind == LOGITS else kind)
            assert effects[(sender, receiver, kind)] == pytest.approx(reference.clean - reference.patched,
                                                                     abs=1e-5)
        assert found.metric == ("logprob" if scalar is None else "mean_logit_diff")


def test_the_fast_method_costs_passes_linear_in_the_nodes(wired, wired_found, composite):
    # Rejects an O(nodes^2) "fast" method (step 3 of path patching per edge): its passes grow with the pairs.
    found, data = wired_found
    with_receivers = [s for s in NODES if any(r[0] > s[0] for r in NODES)]
    assert found.passes == 2 + 1 + len(NODES) + 3 * len(with_receivers) + len(NODES)
    exact = circuit(wired.model, data, NODES, exact=True, **QUICK)
    pairs = sum(r[0] > s[0] for s in NODES for r in NODES)
    assert exact.passes == 2 + len(NODES) + 3 * pairs + len(NODES)
    everything = [(layer, head) for layer in range(4) for head in range(8)]
    big = circuit(composite.model, composite.data(8, 0), everything, n_boot=50)
    pairs = sum(r[0] > s[0] for s in everything for r in everything)
    assert big.passes <= 5 * len(everything) + 3 < 3 * pairs
    assert found.seconds > 0 and big.seconds > 0


def test_intervals_resample_prompts(wired):
    # Rejects a bootstrap that does not resample prompts (an interval of width zero, or one drawn over
    # edges or heads): the interval must be the percentile interval of means over resampled prompts of
    # the per-prompt effects, each of which is path patching on that prompt alone.
    data = without_twin(wired.data(24, 0))  # mean ablation: the effect differs from prompt to prompt
    found = circuit(wired.model, data, NODES, exact=False, n_boot=300, level=0.8, bootstrap_seed=7)
    edge = next(e for e in found.edges if (e.sender, e.receiver, e.input) == (PREVIOUS, INDUCTION, "k"))
    from chg_tlens.analysis.baselines import mean_head_activations
    from chg_tlens.analysis.patching import PathPatchingRun, target_logprob_per_example

    run = PathPatchingRun(wired.model, data, None, ablated_z=mean_head_activations(wired.model, data))
    with torch.no_grad():
        clean_logits, _ = run.caches()
        _, recorded = run.record([PREVIOUS], "k", [INDUCTION[0]])
        patched = run.patched_logits([INDUCTION], "k", recorded)
    rows = target_logprob_per_example(data)
    per_prompt = (rows(clean_logits) - rows(patched)).double().numpy()
    assert per_prompt.std() > 1e-3  # prompts differ, so the interval has width
    means = per_prompt[resample_indices(len(data), 300, seed=7)].mean(axis=1)
    low, high = np.quantile(means, [0.1, 0.9])
    assert edge.effect == pytest.approx(per_prompt.mean(), abs=1e-5)
    assert (edge.low, edge.high) == pytest.approx((low, high), abs=1e-5)
    assert edge.high - edge.low > 1e-3


def test_mean_ablation_is_used_and_said_when_there_is_no_twin(wired):
    # Rejects a silent fall-back to zero ablation (or to anything but each head's mean output): the
    # counterfactual metric must be the model's with every head at its mean over the prompts.
    from chg_tlens.analysis.baselines import mean_head_activations
    from chg_tlens.analysis.patching import target_logprob_metric
    from chg_tlens.core import interventions

    data = without_twin(wired.data(48, 2))
    found = circuit(wired.model, data, NODES, **QUICK)
    assert found.counterfactual == "mean" and kept_edges(found) == set(WIRED_EDGES)
    means = mean_head_activations(wired.model, data)
    hooks = [interventions.replace(layer, means[layer]) for layer in range(3)]
    with torch.no_grad(), wired.model.hooks(fwd_hooks=hooks):
        all_mean = target_logprob_metric(data)(wired.model(data.tokens))
    assert found.counterfactual_metric == pytest.approx(float(all_mean), abs=1e-5)
    exact = circuit(wired.model, data, NODES, exact=True, **QUICK)
    np.testing.assert_allclose(found.to_frame()["effect"], exact.to_frame()["effect"], atol=2e-5)


# ------------------------------------------------------------------------------------------ keeping it alone
def test_the_circuit_kept_alone_beats_random_circuits_and_a_cut_edge_costs_its_effect(wired, wired_found):
    # Rejects an ablation that ignores the edges (keeps the nodes with all their edges) or that ablates
    # the circuit instead of its complement: cutting the key edge 0.0 -> 1.0 must cost exactly what path
    # patching says that edge carries, and the circuit must beat every random node set of its size.
    found, data = wired_found
    result = found.ablate(wired.model, data, n_random=8, seed=0)
    assert result.share == pytest.approx(1.0, abs=1e-6)
    assert result.nodes_only_share == pytest.approx(1.0, abs=1e-6)
    assert result.share > max(result.random_shares) and result.random_mean < 0.9
    assert len(result.random_sets) == 8 and all(len(s) == len(NODES) for s in result.random_sets)
    assert found.ablation == result.as_dict()
    key = next(e for e in found.edges if (e.sender, e.receiver, e.input) == (PREVIOUS, INDUCTION, "k"))
    cut = dataclasses.replace(found, edges=[dataclasses.replace(e, kept=e is not key and e.kept)
                                            for e in found.edges])
    without_key = cut.ablate(wired.model, data, n_random=0)
    assert without_key.circuit == pytest.approx(result.full - key.effect, abs=1e-5)
    assert without_key.nodes_only == pytest.approx(result.full, abs=1e-6)  # the nodes alone still have it
    cut_everything = found.prune(100.0).ablate(wired.model, data, n_random=0)  # every edge, logits too
    assert cut_everything.circuit == pytest.approx(result.nothing, abs=1e-6)


def test_save_and_load_round_trip(wired, wired_found, tmp_path):
    # Rejects a file that loses precision or flags (rounded effects, kept flags or node details dropped),
    # and a loader that accepts someone else's JSON.
    found, data = wired_found
    found.ablate(wired.model, data, n_random=3)
    (tmp_path / "run").mkdir()
    path = found.save(tmp_path / "run")
    assert path == tmp_path / "run" / CIRCUIT_FILE
    assert [p.name for p in path.parent.iterdir()] == [CIRCUIT_FILE]  # no temporary file left behind
    loaded = Circuit.load(path.parent)
    pd.testing.assert_frame_equal(loaded.to_frame(), found.to_frame())
    assert loaded.node_info == found.node_info and loaded.nodes == found.nodes
    assert loaded.ablation == json.loads(json.dumps(found.ablation))
    assert loaded.to_json() == json.loads(json.dumps(found.to_json()))
    assert loaded.provenance["data_fingerprint"] == data.fingerprint()
    assert loaded.provenance["model_name"] == "planted-wiring"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ResultFileError, match="not a chg_tlens circuit"):
        Circuit.load(other)
    with pytest.raises(ResultFileError, match="missing"):
        Circuit.load(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------ nodes
@pytest.fixture(scope="module")
def repeat_run(repeat, tmp_path_factory):
    """A small CHG fit of the planted repeat model written as a run folder, as ``chg-tlens fit`` does."""
    result = fit_chg(repeat.model, repeat.data(128, 0),
                     CHGConfig(n_seeds=2, steps=150, batch_size=32, progress=False))
    folder = tmp_path_factory.mktemp("circuit-run")
    write_run_folder(result, folder, {"command": "test", "model": "planted-repeat", "task": "planted-repeat"},
                     pictures=False, report=False)  # the command under test writes the report
    return folder, result


def test_nodes_come_from_the_roles_or_the_scores_as_asked(repeat, repeat_run, wired):
    # Rejects taking "facilitating" from the retention gate G+ (open for irrelevant heads too) instead of G-:
    # the nodes must be exactly the result's own facilitating heads, with its G+, G- and confidence.
    _, result = repeat_run
    data = repeat.data(32, 5)
    roles = result.roles()
    found = circuit(repeat.model, data, result, **QUICK)
    assert found.nodes == sorted(roles["facilitating"]) and found.source == "chg"
    for node in found.nodes:
        info = found.node_info[node]
        assert info["role"] == "facilitating"
        assert info["g_plus"] == pytest.approx(float(result.g_plus[:, node[0], node[1]].mean()))
        assert info["g_minus"] == pytest.approx(float(result.g_minus[:, node[0], node[1]].mean()))
        assert info["confidence"] == pytest.approx(float(result.confidence()[:, node[0], node[1]].mean()))
    both = circuit(repeat.model, data, result, interfering=True, **QUICK)
    assert both.nodes == sorted(roles["facilitating"] + roles["interfering"])
    assert {both.node_info[h]["role"] for h in roles["interfering"]} <= {"interfering"}
    strict = result.roles(min_confidence=0.9)["facilitating"]  # the fit's own reading of its confidence
    if strict:
        assert circuit(repeat.model, data, result, min_confidence=0.9, **QUICK).nodes == sorted(strict)
    else:
        with pytest.raises(InputError, match="min_confidence=0.9"):
            circuit(repeat.model, data, result, min_confidence=0.9, **QUICK)
    scores = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    top = circuit(wired.model, wired.data(16, 0), scores, top_k=3, **QUICK)
    assert top.nodes == [(2, 1), (2, 2), (2, 3)] and top.node_info[(2, 3)]["score"] == 11.0
    above = circuit(wired.model, wired.data(16, 0), scores.numpy(), score_threshold=9.5, **QUICK)
    assert above.nodes == [(2, 2), (2, 3)] and above.source == "scores"


def test_bad_input_is_refused_naming_the_argument(wired, repeat, repeat_run):
    # Rejects a check-free implementation that fails deep inside (an IndexError from a head out of range,
    # an AttributeError on a missing twin) or silently returns an empty circuit.
    data = wired.data(8, 0)
    model = wired.model
    closed = torch.full((1, 2, 4), -6.0)  # G- closed everywhere: no head facilitates
    nothing_facilitates = CHGResult(closed, -closed, closed)
    cases = [
        ("source", lambda: circuit(model, data, [])),
        ("source", lambda: circuit(model, data, [(0, 0), (3, 0)])),
        ("source", lambda: circuit(model, data, "L0H0")),
        ("counterfactual='corrupt'", lambda: circuit(model, without_twin(data), NODES,
                                                     counterfactual="corrupt")),
        ("counterfactual", lambda: circuit(model, data, NODES, counterfactual="zero")),
        ("metric='logit_diff'", lambda: circuit(model, without_twin(data), NODES, metric="logit_diff")),
        ("metric", lambda: circuit(model, data, NODES, metric="accuracy")),
        ("metric", lambda: circuit(model, data, NODES, metric=lambda logits: logits[:, -1])),
        ("inputs", lambda: circuit(model, data, NODES, inputs=("k", "o"))),
        ("inputs", lambda: circuit(model, data, NODES, inputs=())),
        ("threshold", lambda: circuit(model, data, NODES, threshold=-0.1)),
        ("top_k / score_threshold", lambda: circuit(model, data, torch.ones(3, 4))),
        ("score_threshold", lambda: circuit(model, data, torch.ones(3, 4), score_threshold=2.0)),
        ("source", lambda: circuit(model, data, torch.ones(2, 4), top_k=2)),
        ("top_k", lambda: circuit(model, data, torch.ones(3, 4), top_k=0)),
        ("n_boot", lambda: circuit(model, data, NODES, n_boot=0)),
        ("level", lambda: circuit(model, data, NODES, level=1.0)),
        ("source", lambda: circuit(repeat.model, repeat.data(8, 0), nothing_facilitates)),
        ("top_k", lambda: circuit(repeat.model, repeat.data(8, 0), repeat_run[1], top_k=2)),
        ("model", lambda: circuit(torch.nn.Linear(2, 2), data, NODES)),
    ]
    for argument, call in cases:
        with pytest.raises(InputError, match=re.escape(argument)):
            call()
    with pytest.raises(InputError, match="inputs"):
        circuit(model, data, NODES, inputs=("q", "o"))
    found = circuit(model, data, [INDUCTION, MOVER], **QUICK)
    with pytest.raises(InputError, match="model"):
        found.ablate(repeat.model, repeat.data(8, 0))
    with pytest.raises(InputError, match="metric"):
        own = circuit(model, data, [INDUCTION, MOVER], metric=lambda logits: logits[:, -2, 0].mean())
        own.ablate(model, data)


# ------------------------------------------------------------------------------------------ pictures
def _hover_script() -> str:
    return """
(function () {
  function hover(selector) {
    var item = document.querySelector(selector);
    item.dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: 40, clientY: 40}));
    var tip = document.querySelector(".circuit-tip");
    return {hidden: tip.hidden, text: tip.textContent, target: tip.getAttribute("data-for"),
            expected: item.getAttribute("data-tip")};
  }
  var out = {node: hover('[data-node="L1H0"]'), edge: hover('[data-edge="L0H0>L1H0:k"]')};
  var pre = document.createElement("pre");
  pre.id = "hover-result";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
"""


def _run_chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *mode, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def test_the_html_draws_every_node_and_edge_and_hovering_shows_the_numbers(wired_found, tmp_path):
    # Rejects a page that draws only the kept edges (or drops a node), fetches anything, or whose hover
    # shows no numbers: all 68 measured edges and 8 nodes must be in the rendered DOM, and hovering a node
    # and an edge must show that element's own figures.
    found, _ = wired_found
    page = found.write_html(tmp_path / "circuit.html")
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.IGNORECASE)
    assert "<link" not in text and not re.search(r"<script[^>]*\bsrc=", text)
    assert "default-src 'none'" in html.unescape(text)
    assert re.search(r'<input type="checkbox" class="show-cut" id="[^"]+" checked>', text)  # few: shown
    script = _hover_script()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    probe = tmp_path / "probe.html"
    allowed = html.escape(f"script-src 'sha256-{digest}' 'sha256-", quote=True)  # the test's script too
    probe.write_text(text.replace(html.escape("script-src 'sha256-", quote=True), allowed)
                     .replace("</body>", f"<script>{script}</script>\n</body>"))
    dom = _run_chromium(probe, tmp_path / "profile-dom", "--dump-dom")
    assert console_lines(dom.stderr) == []
    assert len(re.findall(r'<path class="edge ', dom.stdout)) == len(found.edges) == 68
    for edge in found.edges:
        name = f"{head_name(edge.sender)}&gt;{head_name(edge.receiver)}:{edge.input}"
        assert f'data-edge="{name}"' in dom.stdout
    for node in found.nodes:
        assert f'data-node="{head_name(node)}"' in dom.stdout
    assert 'data-ready="yes"' in dom.stdout  # the page's own script ran under its policy
    hovered = json.loads(html.unescape(re.search(r'<pre id="hover-result">(.*?)</pre>', dom.stdout).group(1)))
    key = next(e for e in found.edges if (e.sender, e.receiver, e.input) == (PREVIOUS, INDUCTION, "k"))
    for item, name in ((hovered["node"], "L1H0"), (hovered["edge"], "L0H0>L1H0:k")):
        assert item["hidden"] is False and item["target"] == name and item["text"] == item["expected"]
    info = found.node_info[INDUCTION]
    shown = f"ablation effect {info['ablation_effect']:.4g} [{info['ablation_low']:.4g}"
    assert shown in hovered["node"]["text"]
    assert f"effect {key.effect:.4g} [{key.low:.4g}, {key.high:.4g}]" in hovered["edge"]["text"]
    assert "L1H0 key" in hovered["edge"]["text"] and "kept" in hovered["edge"]["text"]

    shot = tmp_path / "circuit.png"
    _run_chromium(page, tmp_path / "profile-shot", "--window-size=1000,900", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert (pixels.min(axis=2) < 200).mean() > 0.02, "the screenshot is almost blank"
    blue = np.array([int(POSITIVE[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - blue).max(axis=2) < 30).sum() > 500, "no kept edge visible in the screenshot"
    fragment = found._repr_html_()
    assert fragment.count('<path class="edge ') == 68 and "<html" not in fragment


# ------------------------------------------------------------------------------------------ command line
def test_the_circuit_command_writes_its_files_and_the_report_links_them(repeat_run, capsys):
    # Rejects a command that writes the circuit but leaves the report unaware of it (report rewritten
    # before circuit.html exists, or never), and one whose page lacks the CHG numbers of its nodes.
    folder, result = repeat_run
    assert not (folder / "report.html").exists()
    command = ["circuit", str(folder), "--n", "32", "--random", "3", "--n-boot", "100", "--quiet"]
    assert main(command) == EXIT_OK
    out = capsys.readouterr().out
    assert "circuit of" in out and "random circuits" in out
    found = Circuit.load(folder / CIRCUIT_FILE)
    assert found.nodes == sorted(result.roles()["facilitating"]) and found.counterfactual == "mean"
    assert found.provenance["held_out"] is True and found.ablation is not None
    page = (folder / CIRCUIT_HTML).read_text()
    node = found.nodes[0]
    assert f"G+ {found.node_info[node]['g_plus']:.4g}" in html.unescape(page)
    report = (folder / "report.html").read_text()
    assert '<a href="circuit.html">' in report and '<section id="circuit">' in report
    assert main(["circuit", str(folder / "absent")]) == EXIT_USAGE
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["circuit"]
    assert all(action.help for action in sub._actions if action.option_strings)
