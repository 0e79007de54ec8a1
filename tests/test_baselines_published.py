"""Baselines as their papers publish them: Michel et al.'s per-layer normalised HISP, attribution patching at
both endpoints (Nanda: corrupt run; Syed et al.'s EAP: clean run), each checked against the number it
estimates."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_bridge, random_twins

from chg_tlens.analysis import baselines
from chg_tlens.core import interventions
from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models.adapter import legacy_model_class
from chg_tlens.testbeds.benchmark_models import induction_circuit

pytestmark = pytest.mark.tl39


# ------------------------------------------------------------------------------ HISP
def test_layer_normalisation_lifts_a_layer_of_several_moderate_heads_over_a_layer_with_one_big_head():
    """Layer 0: one big head and a runner-up; layer 1: four moderate heads. Raw, the runner-up (0, 1)
    outranks every layer-1 head; normalised by each layer's L2 norm (Michel et al.), the big head takes
    most of layer 0's unit norm and the layer-1 heads (1/2 each) pass the runner-up (2/sqrt(20))."""
    raw = torch.tensor([[4.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    normalised = baselines.layer_normalized(raw)
    assert raw[0, 1] > raw[1].max()
    assert normalised[1].min() > normalised[0, 1]
    assert normalised[0, 0] == normalised.max()  # the big head stays first
    torch.testing.assert_close(normalised.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(normalised[1], torch.full((4,), 0.5))
    silent = baselines.layer_normalized(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert torch.equal(silent, torch.tensor([[0.0, 0.0], [0.6, 0.8]]))  # a silent layer stays 0, no NaN


def test_hisp_is_the_raw_importance_normalised_per_layer_on_a_model():
    model = random_bridge()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (6, 8), generator=generator)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[:, 5:] = True
    data = GateData.from_tokens(tokens, mask)
    published = baselines.gradient_importance(model, data)
    raw = baselines.gradient_importance(model, data, normalize=False)
    assert (published.method, raw.method) == ("hisp", "hisp_raw")
    assert published.details["normalized"] and not raw.details["normalized"]
    torch.testing.assert_close(published.scores.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(published.scores, raw.scores / raw.scores.norm(dim=1, keepdim=True))
    assert not torch.allclose(published.scores, raw.scores / raw.scores.norm(), atol=1e-3)  # not global
    with pytest.raises(InputError, match="normalize"):
        baselines.gradient_importance(model, data, absolute=False, normalize=True)


# ------------------------------------------------------------------------------ attribution endpoints
def _directional_derivative(model, data: GateData, endpoint: str, layer: int, head: int,
                            eps: float = 1e-3) -> float:
    """d/de metric(endpoint run with head's z moved by e * (z_clean - z_corrupt)) at e = 0, by central
    differences: the quantity attribution patching at that endpoint estimates with one backward."""
    metric = baselines.target_logprob_metric(data)
    name = interventions.head_hook_name(layer)
    with torch.no_grad():
        _, clean = model.run_with_cache(data.tokens, names_filter=name)
        _, corrupt = model.run_with_cache(data.corrupt.tokens, names_filter=name)
        delta = clean[name] - corrupt[name]
        at_clean = endpoint == "clean"
        base = clean[name] if at_clean else corrupt[name]
        tokens = data.tokens if at_clean else data.corrupt.tokens

        def at(shift: float) -> float:
            with model.hooks(fwd_hooks=[interventions.replace(layer, base + shift * delta, heads=head)]):
                return float(metric(model(tokens)))

        return (at(eps) - at(-eps)) / (2 * eps)


def test_each_endpoint_equals_its_own_directional_derivative_and_they_differ_where_the_metric_bends(
        recall_with_twin):
    """On the recall circuit the log-softmax bends between the two runs, so the gradient at the clean run
    (EAP) and at the corrupt run (attribution patching) give different numbers: each is checked against
    the finite difference at its own endpoint, so a swap of the endpoints (or a sign flip) fails."""
    circuit, data = recall_with_twin
    data = data.subset(list(range(16)))
    corrupt_end = baselines.attribution_patching(circuit.model, data, endpoint="corrupt")
    clean_end = baselines.attribution_patching(circuit.model, data, endpoint="clean")
    assert (corrupt_end.method, clean_end.method) == ("attribution_patching", "eap_clean")
    assert clean_end.details["endpoint"] == "clean" and clean_end.signed
    for layer, head in ((0, 0), (0, 1)):
        for result, endpoint in ((corrupt_end, "corrupt"), (clean_end, "clean")):
            expected = _directional_derivative(circuit.model, data, endpoint, layer, head)
            assert result.scores[layer, head] == pytest.approx(expected, abs=2e-3)
    gap = (corrupt_end.scores - clean_end.scores).abs().max()
    assert gap > 0.2 * corrupt_end.scores.abs().max()
    assert clean_end.scores[0, 0] > 0 > clean_end.scores[0, 1]  # helps / hurts, read as in every method
    with pytest.raises(InputError, match="endpoint"):
        baselines.attribution_patching(circuit.model, data, endpoint="middle")


def test_endpoints_agree_where_the_metric_is_linear_in_the_head_outputs(recall_with_twin):
    """One attention-only layer without LayerNorm: the logits are linear in every head's output, and with
    the residual scaled down 1000-fold the log-softmax is linear to first order, so the gradient is the
    same at both runs and the two endpoints give one answer (at full scale they differ by ~40%)."""
    circuit, data = recall_with_twin
    model = circuit.model
    assert model.cfg.n_layers == 1 and model.cfg.normalization_type is None
    shrink = [("blocks.0.hook_resid_post", lambda resid, hook: resid * 1e-3)]
    with model.hooks(fwd_hooks=shrink):
        corrupt_end = baselines.attribution_patching(model, data, endpoint="corrupt")
        clean_end = baselines.attribution_patching(model, data, endpoint="clean")
    assert corrupt_end.scores.abs().max() > 1e-4
    gap = (corrupt_end.scores - clean_end.scores).abs().max()
    assert gap < 1e-2 * corrupt_end.scores.abs().max()


def test_the_clean_endpoint_sees_a_saturated_softmax_the_corrupt_endpoint_does_not():
    """The induction circuit (an AND) answers the clean prompt with near certainty: at the clean run the
    log-prob gradient vanishes and EAP scores every head near 0, while the corrupt run's gradient finds
    both heads. Each again equals its finite difference."""
    circuit = induction_circuit()
    data = circuit.data(16, 0)
    corrupt_end = baselines.attribution_patching(circuit.model, data, endpoint="corrupt")
    clean_end = baselines.attribution_patching(circuit.model, data, endpoint="clean")
    previous_token, induction = (0, 0), (1, 1)
    assert corrupt_end.scores[induction] > 1.0 and corrupt_end.scores[previous_token] > 0.5
    assert clean_end.scores.abs().max() < 0.2 * corrupt_end.scores[induction]
    for result, endpoint in ((corrupt_end, "corrupt"), (clean_end, "clean")):
        expected = _directional_derivative(circuit.model, data, endpoint, *induction)
        assert float(result.scores[induction]) == pytest.approx(expected, abs=1e-2)


def test_transformer_lens_backend_gives_the_clean_endpoint_too():
    """TransformerLens' attribution_patch at the clean run (its prompts swapped, negated) equals our hooks."""
    if legacy_model_class() is not None:
        pytest.skip("TransformerLens 3.9 has no tools.analysis.attribution_patch")
    model = random_bridge()
    data = random_twins(4)
    ours = baselines.attribution_patching(model, data, backend="hooks", endpoint="clean")
    theirs = baselines.attribution_patching(model, data, backend="transformer_lens", endpoint="clean")
    assert ours.scores.abs().max() > 1e-3
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-5, rtol=0)
    nanda = baselines.attribution_patching(model, data, backend="hooks")
    assert (nanda.scores - ours.scores).abs().max() > 1e-3


# ------------------------------------------------------------------------------ per-example scores
@pytest.mark.parametrize("method", ["hisp_raw", "attribution_hooks", "eap_clean_hooks", "eap_ig",
                                    "ablation_zero", "patching_denoise", "patching_noise"])
def test_each_examples_row_is_the_method_run_on_that_example_alone(method):
    """The rows a bootstrap over prompts resamples: row i must be the method on example i alone, so
    a resample's mean is the method on the resampled prompts. Rejects rows that drop the batch-mean
    factor (len(batch) x too small), rows written in another order than the examples, and rows of
    another batch; batch_size 5 over 12 examples leaves a short last batch. A random model, so every
    example's row differs."""
    model = random_bridge()
    data = random_twins(12, seed=3, first_target=5)
    run = {
        "hisp_raw": lambda d: baselines.gradient_importance(model, d, batch_size=5, normalize=False),
        "attribution_hooks": lambda d: baselines.attribution_patching(model, d, "hooks", 5),
        "eap_clean_hooks": lambda d: baselines.attribution_patching(model, d, "hooks", 5, "clean"),
        "eap_ig": lambda d: baselines.eap_ig(model, d, steps=2, batch_size=5),
        "ablation_zero": lambda d: baselines.ablation_scores(model, d, "zero", rows_per_pass=10),
        "patching_denoise": lambda d: baselines.activation_patching(model, d, "denoise", 5),
        "patching_noise": lambda d: baselines.activation_patching(model, d, "noise", 5),
    }[method]
    scored = run(data)
    rows = scored.details[baselines.PER_EXAMPLE]
    assert rows.shape == (12, *scored.scores.shape)
    assert torch.allclose(rows.mean(dim=0), scored.scores, atol=1e-6)
    for index in (0, 6, 11):
        alone = run(data.subset([index])).scores
        assert torch.allclose(rows[index], alone, atol=1e-5), (index, rows[index], alone)
    assert not torch.allclose(rows[0], rows[6], atol=1e-5)  # the examples differ, so order is tested


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_activation_patching_scores_are_transformer_lens_batch_means_as_before_rows_were_kept(direction):
    """The rows come from the forwards TransformerLens already runs, so the scores must be what its scalar
    metric gave per batch (the implementation before rows were kept: patched mean - reference mean,
    weighted by batch size), for the same count of forwards. Rejects rows matched to the wrong heads
    (a head-major reshape) and a reference taken from the other run."""
    from chg_tlens.analysis.patching import patching_scores, target_logprob_metric
    model = random_bridge()
    data = random_twins(12, seed=3, first_target=5)
    scored = baselines.activation_patching(model, data, direction, batch_size=5)
    total = torch.zeros(2, 4)
    for start in range(0, 12, 5):
        batch = data.subset(slice(start, start + 5))
        metric = target_logprob_metric(batch)
        source, run_on = (batch, batch.corrupt) if direction == "denoise" else (batch.corrupt, batch)
        patched = patching_scores(model, source, run_on, metric=metric, normalize=False)
        with torch.no_grad():
            reference = float(metric(model(run_on.tokens)))
        total += (patched - reference if direction == "denoise" else reference - patched) * len(batch)
    torch.testing.assert_close(scored.scores, total / 12, atol=1e-5, rtol=0)
    assert scored.scores.abs().max() > 1e-2
    assert scored.forward_passes == 12 * (2 + 2 * 4)


def test_patching_rows_refuse_a_transformer_lens_that_patches_heads_in_another_order(monkeypatch):
    """The rows are matched to heads by the order of TransformerLens' metric calls; a TransformerLens
    that visited heads in another order must be an error, never rows silently given to other heads."""
    from transformer_lens import patching as tl_patching

    from chg_tlens.analysis.patching import patching_rows
    model = random_bridge()
    data = random_twins(6, seed=3, first_target=5)
    real = tl_patching.get_act_patch_attn_head_out_all_pos

    def head_major(model, corrupt_tokens, cache, metric):
        scores = real(model, corrupt_tokens, cache, metric)  # calls metric layer-major, fills the table
        return scores.T.contiguous().reshape(scores.shape)  # as if the calls had gone head by head

    rows = patching_rows(model, data, data.corrupt)
    assert rows.shape == (6, 2, 4)
    monkeypatch.setattr(tl_patching, "get_act_patch_attn_head_out_all_pos", head_major)
    with pytest.raises(RuntimeError, match="order other than layer by layer"):
        patching_rows(model, data, data.corrupt)


def test_normalised_hisp_keeps_no_per_example_rows(recall_with_twin):
    """A per-layer norm of the mean is not the mean of any rows, so none are offered for resampling."""
    circuit, data = recall_with_twin
    assert baselines.PER_EXAMPLE not in baselines.gradient_importance(circuit.model, data).details


def test_mean_ablation_rows_are_each_examples_loss_change_at_the_dataset_mean():
    """Mean ablation's reference is a statistic of the whole data, so row i is example i's own change
    with the head at the mean over *all* examples (not over example i alone, which would be a zero
    change for a one-example mean at every position it reaches). Rejects rows in another order and
    rows taken against a per-example mean."""
    from chg_tlens.core import interventions
    model = random_bridge()
    data = random_twins(6, seed=4, first_target=5)
    scored = baselines.ablation_scores(model, data, "mean", batch_size=4)
    rows = scored.details[baselines.PER_EXAMPLE]
    assert torch.allclose(rows.mean(dim=0), scored.scores, atol=1e-6)
    means = baselines.mean_head_activations(model, data, 4)
    for index, (layer, head) in ((1, (0, 1)), (4, (1, 0))):
        alone = data.subset([index])
        hook = interventions.replace(layer, means[layer], heads=head)
        full = baselines._metric_with_hooks(model, alone, [], 1)
        ablated = baselines._metric_with_hooks(model, alone, [hook], 1)
        assert abs(float(rows[index, layer, head]) - (full - ablated)) < 1e-5
        assert abs(float(rows[index, layer, head])) > 1e-6


def test_subnetwork_probing_sweep_trains_on_kl_and_scores_by_the_pressure_a_head_survives():
    """SP as the ACDC paper runs it: KL to the unmasked model, one run per sparsity weight, kept sets
    over the sweep. With no sparsity weight every head stays (the KL is 0 with all masks open); under the
    strongest weight only heads the output depends on survive; every planted facilitating head of the
    composite model outranks every irrelevant head. Rejects a KL taken against the masked model itself
    (0 for any mask, so every head closes under any weight and the facilitating heads tie with the
    rest) and a score that ignores how many runs keep a head. Heads the output does not depend on are free
    under no sparsity weight: 0.2 shifts every logit alike, so its KL gradient is float rounding, which
    Adam's normalised steps turn into a random walk (with transformers 5.25 it closes)."""
    from chg_tlens.analysis.compare import OPT_IN_METHODS, method_names
    from chg_tlens.testbeds.composite import composite_circuit

    circuit = composite_circuit()
    scored = baselines.subnetwork_probing_sweep(circuit.model, circuit.data(48, 0),
                                                l0_weights=(0.0, 0.3, 3.0, 30.0), steps=80, batch_size=16)
    kept = [point["kept"] for point in scored.details["sweep"]]
    roles = circuit.true_roles()
    assert bool(kept[0][torch.as_tensor(roles != "irrelevant")].all())
    strongest = kept[-1].numpy()
    assert 0 < strongest.sum() < 8 and (roles[strongest] != "irrelevant").all()
    facilitating = torch.as_tensor(roles == "facilitating")
    irrelevant = torch.as_tensor(roles == "irrelevant")
    assert scored.scores[facilitating].min() > scored.scores[irrelevant].max()
    assert "subnetwork_probing_sweep" in OPT_IN_METHODS
    assert "subnetwork_probing_sweep" not in method_names()
    assert method_names(["subnetwork_probing_sweep"]) == ["subnetwork_probing_sweep"]
