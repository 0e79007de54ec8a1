"""Mean ablation over a reference distribution that respects each template's positions: every example's
head is replaced by the mean over the examples of its own template (Wang et al.'s IOI, ACDC), not by a
position-wise mean that mixes templates."""

from __future__ import annotations

import pytest
import torch

from chg_tlens.analysis import baselines, compare
from chg_tlens.analysis.circuit import Circuit, circuit
from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.testbeds.benchmark_models import induction_circuit
from chg_tlens.testbeds.planted import recall_tokens

pytestmark = pytest.mark.tl39

GROUPS = torch.tensor([7, 2, 2, 7, 2, 2, 7, 2, 2, 7, 2, 2])
"""Two templates, unequal in size, interleaved so batches of 5 cut through both, with ids that are
neither 0..G-1 nor in order of first appearance."""


def _two_templates() -> GateData:
    """Recall prompts whose position 1 (the word the last token repeats) is fixed by the template: token 3
    in template 7, token 6 in template 2. The recall model's heads 0.0 (for the answer) and 0.1 (against
    it) attend to position 1 from every query, so their output is constant within a template and
    differs between the two."""
    tokens, mask = recall_tokens(len(GROUPS), 8, 10, seed=0)
    tokens[:, 1] = torch.where(GROUPS == 7, 3, 6)
    tokens[:, -1] = tokens[:, 1]
    return GateData.from_tokens(tokens, mask, groups=GROUPS)


def test_a_head_constant_within_its_template_loses_nothing_at_its_templates_mean_but_does_at_the_pooled_one(
        recall):
    """Replacing a head by its own template's mean changes nothing when the head's output is the same on
    every prompt of the template, so every score and every example's row is 0; the pooled mean gives
    each template half of the other template's word, which costs 0.0 (facilitating) log-prob and helps
    where 0.1 pushed against the answer. Rejects: groups ignored (the pooled mean), a mean over
    positions within a group (position 0 sees only BOS, so the head's mean over positions is not its
    output at the answer), group means handed to the wrong examples (ids used as row numbers, rows not
    advanced from batch to batch), and a template reference that is not the default when groups exist."""
    data = _two_templates()
    template = baselines.ablation_scores(recall.model, data, "mean", batch_size=5)
    assert template.details["reference"] == "template" and template.details["n_reference_groups"] == 2
    rows = template.details[baselines.PER_EXAMPLE]
    assert rows.shape == (len(data), 1, 4) and rows.abs().max() < 1e-5
    pooled = baselines.ablation_scores(recall.model, data, "mean", batch_size=5, reference="all")
    assert pooled.details["reference"] == "all" and pooled.details["n_reference_groups"] == 1
    assert pooled.scores[0, 0] > 1.0 and pooled.scores[0, 1] < -0.3
    assert pooled.scores[0, 2:].abs().max() < 1e-6  # scratch writers matter under neither reference
    pooled_rows = pooled.details[baselines.PER_EXAMPLE][:, 0, 0]
    # the smaller template is further from the pooled mean, so it loses more: the rows follow the examples
    assert pooled_rows[GROUPS == 7].min() > pooled_rows[GROUPS == 2].max() + 0.5
    assert template.forward_passes == pooled.forward_passes == len(data) * (2 + 4)


def test_one_template_is_the_pooled_mean_and_data_without_groups_uses_it(recall):
    """A single group is every example: the template reference must then equal the pooled one, and data
    without groups must default to the pooled mean. Rejects a template default for data without groups
    (refused for want of groups) and group ids used as row numbers of the per-group means."""
    data = _two_templates()
    single = baselines.ablation_scores(recall.model, data.with_groups([5] * len(data)), "mean", batch_size=5)
    pooled = baselines.ablation_scores(recall.model, data, "mean", batch_size=5, reference="all")
    plain = baselines.ablation_scores(recall.model, data.with_groups(None), "mean", batch_size=5)
    assert single.details["reference"] == "template" and plain.details["reference"] == "all"
    torch.testing.assert_close(single.scores, pooled.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.details[baselines.PER_EXAMPLE], pooled.details[baselines.PER_EXAMPLE])


def test_group_means_are_each_groups_own_mean_over_the_examples_that_reach_each_position():
    """Per example, its group's mean at each position, over the group's examples that reach it; by hand
    from one cached run, on the induction task's prompts of several lengths grouped so that padding
    falls inside groups. Rejects: a group's sums divided by every example's counts, padding counted, a
    mean over positions, groups read from the wrong rows of a later batch (batch_size 5 over 12)."""
    circuit = induction_circuit()
    data = circuit.data(12, 0)
    groups = torch.tensor([3, 1, 3, 3, 0, 1, 0, 3, 1, 1, 0, 3])
    means = baselines.mean_head_activations(circuit.model, data, batch_size=5, groups=groups)
    with torch.no_grad():
        _, cache = circuit.model.run_with_cache(data.tokens)
    for layer in (0, 1):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert means[layer].shape == (len(data), *z.shape[1:])
        for example in range(len(data)):
            for position in range(data.tokens.shape[1]):
                members = (groups == groups[example]) & (data.lengths > position)
                expected = z[members, position].mean(dim=0) if members.any() else torch.zeros(z.shape[2:])
                torch.testing.assert_close(means[layer][example, position], expected, atol=1e-5, rtol=0)
    pooled = baselines.mean_head_activations(circuit.model, data, batch_size=5)
    assert pooled[1].shape == z.shape[1:]
    assert not torch.allclose(means[1][0], pooled[1], atol=1e-3)


def test_a_template_reference_needs_groups_and_bad_references_are_named(recall):
    data = _two_templates()
    with pytest.raises(InputError, match=r"reference='template' needs data.groups.*reference='all'"):
        baselines.ablation_scores(recall.model, data.with_groups(None), "mean", reference="template")
    with pytest.raises(InputError, match="reference must be 'template' or 'all', got 'pooled'"):
        baselines.ablation_scores(recall.model, data, "mean", reference="pooled")
    with pytest.raises(InputError, match="zero ablation has no reference"):
        baselines.ablation_scores(recall.model, data, "zero", reference="all")
    with pytest.raises(InputError, match=r"groups must be one integer id per example, shape \[12\]"):
        baselines.mean_head_activations(recall.model, data, groups=GROUPS[:5])


def test_the_faithfulness_curve_and_the_circuit_ablate_to_each_templates_mean(recall, tmp_path):
    """The same reference in the other two places that mean-ablate heads. Every head of the recall model
    is constant within a template, so with every head at its own template's mean nothing changes, while
    the pooled mean costs the task. Rejects: a pooled mean behind the template default, the per-example
    means not advanced from batch to batch (batches of 5 cut through both templates), a reference's rows
    matched to the data by position rather than by template, and a circuit that forgets its reference
    when saved."""
    data = _two_templates()
    order = [2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11][::-1]
    heads = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    template = compare.ablated_faithfulness_curve(recall.model, data, heads, ks=[0, 1], batch_size=5)
    assert template["metric_none"].iloc[0] == pytest.approx(template["metric_all"].iloc[0], abs=1e-5)
    assert template["metric"].tolist() == pytest.approx([template["metric_all"].iloc[0]] * 2, abs=1e-5)
    pooled = compare.ablated_faithfulness_curve(recall.model, data, heads, ks=[0, 1], batch_size=5,
                                                mean_reference="all")
    assert pooled["metric_all"].iloc[0] - pooled["metric_none"].iloc[0] > 0.5
    shuffled = data.subset(torch.tensor(order))
    elsewhere = compare.ablated_faithfulness_curve(recall.model, data, heads, ks=[0, 1], batch_size=5,
                                                   reference=shuffled)
    assert elsewhere["metric_none"].iloc[0] == pytest.approx(template["metric_none"].iloc[0], abs=1e-5)
    with pytest.raises(InputError, match=r"templates \[2\]"):
        compare.ablated_faithfulness_curve(recall.model, data, heads, reference=data.subset(GROUPS == 7))
    with pytest.raises(InputError, match="mean_reference"):
        compare.ablated_faithfulness_curve(recall.model, data.with_corrupt(data), heads, ablation="corrupt",
                                           mean_reference="all")

    nodes = [(0, 0), (0, 1)]
    own = circuit(recall.model, data, nodes, counterfactual="mean", n_boot=20)
    assert own.mean_reference == "template" and own.total_effect == pytest.approx(0.0, abs=1e-5)
    assert max(abs(edge.effect) for edge in own.edges) < 1e-5
    mixed = circuit(recall.model, data, nodes, counterfactual="mean", mean_reference="all", n_boot=20)
    assert mixed.mean_reference == "all" and mixed.total_effect > 0.5
    assert Circuit.load(mixed.save(tmp_path / "mixed.json")).mean_reference == "all"
    assert Circuit.load(own.save(tmp_path / "own.json")).mean_reference == "template"
    with pytest.raises(InputError, match="mean_reference"):
        circuit(recall.model, data.with_corrupt(data), nodes, counterfactual="corrupt", mean_reference="all")
