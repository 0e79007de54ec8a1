"""Baseline head scores: each finds the planted facilitating head, signs mean what they say, the
numbers match the definitions (finite differences, hand patching, TransformerLens' own attribution)."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import random_bridge, random_twins

from chg_tlens.analysis import baselines
from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import target_logprobs
from chg_tlens.errors import InputError
from chg_tlens.models.adapter import legacy_model_class
from chg_tlens.testbeds.benchmark_models import induction_circuit, interfering_circuit

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39


def _run(name: str, model, data) -> baselines.HeadScores:
    runs = {
        "gradient_importance": lambda: baselines.gradient_importance(model, data),
        "hisp_raw": lambda: baselines.gradient_importance(model, data, normalize=False),
        "gradient_signed": lambda: baselines.gradient_importance(model, data, absolute=False),
        "ablation_zero": lambda: baselines.ablation_scores(model, data, "zero"),
        "ablation_mean": lambda: baselines.ablation_scores(model, data, "mean"),
        "patching_denoise": lambda: baselines.activation_patching(model, data, "denoise"),
        "patching_noise": lambda: baselines.activation_patching(model, data, "noise"),
        "attribution": lambda: baselines.attribution_patching(model, data),
        "eap_clean": lambda: baselines.attribution_patching(model, data, endpoint="clean"),
        "subnetwork_probing": lambda: baselines.subnetwork_probing(model, data, steps=80, batch_size=16),
    }
    return runs[name]()


ALL = ["gradient_importance", "hisp_raw", "gradient_signed", "ablation_zero", "ablation_mean",
       "patching_denoise", "patching_noise", "attribution", "eap_clean", "subnetwork_probing"]
SIGNED = ["gradient_signed", "ablation_zero", "ablation_mean", "patching_denoise", "patching_noise",
          "attribution", "eap_clean"]


@pytest.mark.parametrize("name", ALL)
def test_each_baseline_ranks_the_planted_facilitating_head_first(recall_with_twin, name):
    circuit, data = recall_with_twin
    result = _run(name, circuit.model, data)
    assert result.scores.shape == (1, 4)
    assert torch.isfinite(result.scores).all()
    assert divmod(int(result.scores.argmax()), 4) == circuit.heads_with_role("facilitating")[0]
    assert result.seconds >= 0 and result.forward_passes > 0


@pytest.mark.parametrize("name", SIGNED)
def test_signed_methods_score_the_interfering_head_negative_and_irrelevant_heads_zero(recall_with_twin, name):
    circuit, data = recall_with_twin
    result = _run(name, circuit.model, data)
    assert result.signed
    assert result.scores[0, 1] < -0.1  # 0.1 pushes against the answer
    assert result.scores[0, 2:].abs().max() < 1e-4  # 0.2, 0.3 write where nothing reads


def test_gradient_importance_is_the_gate_value_derivative_per_example():
    """mean_x |d logprob(x) / d g| against central finite differences taken example by example, raw
    (``hisp_raw``) and divided by each layer's L2 norm after averaging (``hisp``, Michel et al.).

    On a random model the examples disagree in sign, so |mean of grads| is far below mean of |grads|:
    an implementation that took one batch-level gradient (or averaged before the absolute value) fails,
    and so does one that normalised each example before averaging.
    """
    model = random_bridge()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (6, 8), generator=generator)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[:, 5:] = True
    data = GateData.from_tokens(tokens, mask)
    result = baselines.gradient_importance(model, data, batch_size=4, normalize=False)  # batches of 4, 2
    published = baselines.gradient_importance(model, data, batch_size=4)
    signed = baselines.gradient_importance(model, data, batch_size=4, absolute=False)
    eps = 1e-3

    def per_example(layer: int, head: int, gate: float) -> torch.Tensor:
        scale = torch.ones(4)
        scale[head] = gate
        hooks = [(f"blocks.{layer}.attn.hook_z", lambda z, hook: z * scale[None, None, :, None])]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            return target_logprobs(model(tokens), tokens, mask)[0]

    derivative = torch.stack([
        torch.stack([(per_example(layer, head, 1 + eps) - per_example(layer, head, 1 - eps)) / (2 * eps)
                     for head in range(4)])
        for layer in range(2)
    ])  # [layer, head, example]
    magnitude, mean = derivative.abs().mean(dim=-1), derivative.mean(dim=-1)
    assert (mean.abs() < 0.6 * magnitude).sum() >= 4  # the per-example and batch answers differ
    torch.testing.assert_close(result.scores, magnitude, atol=1e-3, rtol=0)
    torch.testing.assert_close(signed.scores, mean, atol=1e-3, rtol=0)
    assert not torch.allclose(result.scores, mean.abs(), atol=1e-2)
    assert result.forward_passes == 6 and result.backward_passes == 6
    assert (result.method, published.method, signed.method) == ("hisp_raw", "hisp", "gradient_signed")
    normalised = magnitude / magnitude.norm(dim=1, keepdim=True)
    torch.testing.assert_close(published.scores, normalised, atol=3e-3, rtol=0)  # FD noise, rescaled
    per_example = (derivative.abs() / derivative.abs().norm(dim=1, keepdim=True)).mean(dim=-1)
    assert not torch.allclose(published.scores, per_example, atol=1e-2)  # normalise after averaging


def test_denoising_patching_equals_patching_one_head_by_hand(recall_with_twin):
    circuit, data = recall_with_twin
    model = circuit.model
    result = baselines.activation_patching(model, data, "denoise")
    metric = baselines.target_logprob_metric(data)
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens)
        clean_z = cache["blocks.0.attn.hook_z"]

        def patch_head_0(z, hook):
            z = z.clone()
            z[:, :, 0] = clean_z[:, :, 0]
            return z

        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", patch_head_0)]):
            patched = float(metric(model(data.corrupt.tokens)))
        corrupt = float(metric(model(data.corrupt.tokens)))
    assert result.scores[0, 0] == pytest.approx(patched - corrupt, abs=1e-5)
    assert result.details["reference_metric"] == pytest.approx(corrupt, abs=1e-5)


def test_attribution_patching_hooks_match_transformer_lens_on_a_model_with_mlps():
    model = random_bridge()
    data = random_twins()
    ours = baselines.attribution_patching(model, data, backend="hooks")
    assert ours.scores.abs().max() > 1e-3
    if legacy_model_class() is not None:
        # TransformerLens 3.9's attribution_patch takes a TransformerBridge only: refused by name, and
        # "auto" falls back to our hooks, saying why.
        with pytest.raises(InputError, match=r"needs a TransformerBridge \(TransformerLens 4\)"):
            baselines.attribution_patching(model, data, backend="transformer_lens")
        auto = baselines.attribution_patching(model, data)
        assert auto.details["backend"] == "hooks" and "TransformerLens 4" in auto.details["fallback_reason"]
        assert torch.equal(auto.scores, ours.scores)
        return
    theirs = baselines.attribution_patching(model, data, backend="transformer_lens")
    assert theirs.details["backend"] == "transformer_lens"
    assert torch.allclose(ours.scores, theirs.scores, atol=1e-5)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_attribution_patching_falls_back_to_hooks_on_an_attention_only_model(recall_with_twin):
    circuit, data = recall_with_twin
    available, why = baselines.transformer_lens_attribution_available(circuit.model)
    assert not available and ("TransformerLens 4" if legacy_model_class() else "hook_mlp_out") in why
    result = baselines.attribution_patching(circuit.model, data)
    assert result.details["backend"] == "hooks"
    with pytest.raises(ValueError, match="cannot run"):
        baselines.attribution_patching(circuit.model, data, backend="transformer_lens")


def test_mean_activations_skip_padding():
    """Variable-length data: each position's mean counts only the examples that reach it."""
    circuit = induction_circuit()
    data = circuit.data(12, 0)
    assert (data.lengths != data.lengths.max()).any()
    means = baselines.mean_head_activations(circuit.model, data, batch_size=5)
    with torch.no_grad():
        _, cache = circuit.model.run_with_cache(data.tokens)
    z = cache["blocks.1.attn.hook_z"]
    last = int(data.lengths.max()) - 1
    reaching = data.lengths > last
    assert torch.allclose(means[1][last], z[reaching, last].mean(dim=0), atol=1e-5)
    assert torch.allclose(means[1][0], z[:, 0].mean(dim=0), atol=1e-5)


def test_mean_and_zero_ablation_differ_where_a_head_has_a_constant_part(recall_with_twin):
    circuit, data = recall_with_twin
    zero = baselines.ablation_scores(circuit.model, data, "zero")
    mean = baselines.ablation_scores(circuit.model, data, "mean")
    # 0.0 copies a random token: its mean output still carries some of every token, zero carries none.
    assert not torch.allclose(zero.scores[0, 0], mean.scores[0, 0], atol=1e-3)
    assert zero.forward_passes == len(data) * 5
    assert zero.details["metric_all_heads"] == pytest.approx(mean.details["metric_all_heads"], abs=1e-5)


def test_magnitude_gradient_ranks_a_strong_distractor_above_a_weak_helper_signed_methods_do_not():
    circuit = interfering_circuit()
    data = circuit.data(48, 0)
    distractor, weak_helper = (0, 1), (0, 2)
    michel = baselines.gradient_importance(circuit.model, data)
    ablation = baselines.ablation_scores(circuit.model, data, "zero")
    assert michel.scores[distractor] > michel.scores[weak_helper]
    assert ablation.scores[weak_helper] > 0 > ablation.scores[distractor]


def test_denoising_misses_the_previous_token_head_of_a_composition_noising_finds_it():
    circuit = induction_circuit()
    data = circuit.data(32, 0)
    denoise = baselines.activation_patching(circuit.model, data, "denoise")
    noise = baselines.activation_patching(circuit.model, data, "noise")
    previous_token, induction = (0, 0), (1, 1)
    assert denoise.scores[induction] > 1.0
    assert denoise.scores[previous_token] < 0.2 * denoise.scores[induction]
    assert noise.scores[previous_token] > 1.0 and noise.scores[induction] > 1.0


def test_hard_concrete_open_probability_matches_samples():
    log_alpha = torch.tensor([[-2.0, 0.0, 1.5]])
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(20_000, 1, 3, generator=generator).clamp(1e-6, 1 - 1e-6)
    samples = baselines.hard_concrete_sample(log_alpha, uniform)
    assert samples.min() >= 0 and samples.max() <= 1
    assert ((samples == 0).float().mean() > 0.05) and ((samples == 1).float().mean() > 0.05)
    empirical = (samples > 0).float().mean(dim=0)
    assert torch.allclose(empirical, baselines.hard_concrete_p_open(log_alpha), atol=0.02)


def test_subnetwork_probing_keeps_the_needed_head_and_closes_the_rest(recall_with_twin):
    circuit, data = recall_with_twin
    result = baselines.subnetwork_probing(circuit.model, data, steps=100, batch_size=16, seed=1)
    p_open = result.details["p_open"]
    assert p_open[0, 0] > 0.9
    assert (p_open[0, 1:] < 0.2).all()
    assert result.forward_passes == result.backward_passes == 100 * 16
    short = baselines.subnetwork_probing(circuit.model, data, steps=10, batch_size=16, seed=1)
    again = baselines.subnetwork_probing(circuit.model, data, steps=10, batch_size=16, seed=1)
    assert torch.equal(short.scores, again.scores)


def test_random_scores_are_seeded(recall_with_twin):
    circuit, _ = recall_with_twin
    a, b = baselines.random_scores(circuit.model, 3), baselines.random_scores(circuit.model, 3)
    c = baselines.random_scores(circuit.model, 4)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)


def test_methods_leave_the_model_as_they_found_it(recall_with_twin):
    circuit, data = recall_with_twin
    model = circuit.model
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    baselines.gradient_importance(model, data)
    baselines.subnetwork_probing(model, data, steps=5)
    baselines.attribution_patching(model, data)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_fails_early_naming_the_argument(recall_with_twin):
    circuit, data = recall_with_twin
    clean_only = GateData.from_tokens(data.tokens, data.target_mask)
    with pytest.raises(ValueError, match="corrupt twin"):
        baselines.activation_patching(circuit.model, clean_only)
    with pytest.raises(ValueError, match="corrupt twin"):
        baselines.attribution_patching(circuit.model, clean_only)
    with pytest.raises(ValueError, match="kind"):
        baselines.ablation_scores(circuit.model, data, "half")
    with pytest.raises(ValueError, match="direction"):
        baselines.activation_patching(circuit.model, data, "sideways")
    with pytest.raises(InputError, match="GateData"):
        baselines.gradient_importance(circuit.model, data.tokens)
    with pytest.raises(ValueError, match="batch_size"):
        baselines.gradient_importance(circuit.model, data, batch_size=0)
    with pytest.raises(ValueError, match="l0_weight"):
        baselines.subnetwork_probing(circuit.model, data, l0_weight=-1.0)
    with pytest.raises(ValueError, match=r"\[layer, head\]"):
        baselines.HeadScores(torch.zeros(3), "broken")


# ------------------------------------------------------------------------------ EAP-IG
def test_eap_ig_with_one_step_is_attribution_patching_at_its_endpoint_and_more_steps_move_it():
    """Right sum (Hanna et al., the default), one step: the gradient at the clean run, i.e. EAP at the clean
    endpoint; left sum, one step: at the corrupt run, i.e. attribution patching."""
    model = random_bridge()
    data = random_twins()
    one = baselines.eap_ig(model, data, steps=1, batch_size=3)
    clean_end = baselines.attribution_patching(model, data, backend="hooks", batch_size=3, endpoint="clean")
    torch.testing.assert_close(one.scores, clean_end.scores, atol=1e-6, rtol=0)
    left = baselines.eap_ig(model, data, steps=1, batch_size=3, riemann="left")
    attribution = baselines.attribution_patching(model, data, backend="hooks", batch_size=3)
    torch.testing.assert_close(left.scores, attribution.scores, atol=1e-6, rtol=0)
    assert (one.scores - left.scores).abs().max() > 1e-3  # the endpoints are not one point
    assert (one.method, left.method, clean_end.method) == ("eap_ig", "eap_ig_left", "eap_clean")
    several = baselines.eap_ig(model, data, steps=4)
    assert (several.scores - one.scores).abs().max() > 1e-3  # the interpolation changes the gradient
    for item in (several, baselines.eap_ig(model, data, steps=4, riemann="left")):
        assert item.forward_passes == 5 * len(data) and item.backward_passes == 4 * len(data)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(InputError, match="riemann"):
        baselines.eap_ig(model, data, riemann="middle")


@pytest.mark.parametrize(("riemann", "alphas"), [("right", (0.5, 1.0)), ("left", (0.0, 0.5))])
def test_eap_ig_averages_gradients_along_the_interpolated_embeddings(riemann, alphas):
    """steps=2 is the mean of the gradients at alpha = 1/2 and 1 (right, Hanna et al.) or 0 and 1/2 (left),
    taken here by hand."""
    model = random_bridge()
    data = random_twins(n=3)
    result = baselines.eap_ig(model, data, steps=2, riemann=riemann)
    metric = baselines.target_logprob_metric(data)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(data.tokens)
        _, corrupt_cache = model.run_with_cache(data.corrupt.tokens)
    clean_embed, corrupt_embed = clean_cache["hook_embed"], corrupt_cache["hook_embed"]
    delta = [clean_cache[f"blocks.{layer}.attn.hook_z"] - corrupt_cache[f"blocks.{layer}.attn.hook_z"]
             for layer in range(2)]

    def shift(probe, difference):
        return lambda z, hook: z + probe[None, None, :, None] * difference

    expected = torch.zeros(2, 4)
    for alpha in alphas:
        # d metric / d (a shift of each head's z along its clean - corrupt difference), at this alpha
        per_head = [torch.zeros(4, requires_grad=True) for _ in range(2)]
        hooks = [("hook_embed", lambda e, hook, a=alpha: corrupt_embed + a * (clean_embed - corrupt_embed))]
        hooks += [(f"blocks.{layer}.attn.hook_z", shift(per_head[layer], delta[layer])) for layer in range(2)]
        with model.hooks(fwd_hooks=hooks):
            value = metric(model(data.corrupt.tokens))
        grads = torch.autograd.grad(value, per_head)
        expected += torch.stack(grads) / 2
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)


def test_eap_ig_finds_the_planted_heads_of_a_composition(recall_with_twin):
    circuit = induction_circuit()
    data = circuit.data(24, 0)
    result = baselines.eap_ig(circuit.model, data, steps=8)
    assert divmod(int(result.scores.argmax()), result.scores.shape[1]) == (1, 1)  # the induction head
    recall_circuit, recall_data = recall_with_twin
    on_recall = baselines.eap_ig(recall_circuit.model, recall_data, steps=4)
    assert divmod(int(on_recall.scores.argmax()), 4) == recall_circuit.heads_with_role("facilitating")[0]
    assert on_recall.scores[0, 1] < 0  # the interfering head
    with pytest.raises(InputError, match="steps"):
        baselines.eap_ig(recall_circuit.model, recall_data, steps=0)
    with pytest.raises(InputError, match="corrupt twin"):
        clean_only = GateData.from_tokens(recall_data.tokens, recall_data.target_mask)
        baselines.eap_ig(recall_circuit.model, clean_only)


@pytest.mark.parametrize("riemann", ["right", "left"])
def test_eap_ig_sweep_reads_every_step_count_off_one_run_and_each_equals_its_own_run(riemann):
    model = random_bridge()
    data = random_twins()
    sweep = baselines.eap_ig_sweep(model, data, steps=(1, 2, 4), batch_size=3, riemann=riemann)
    assert [item.details["steps"] for item in sweep] == [1, 2, 4]
    assert all(item.details["riemann"] == riemann for item in sweep)
    for item in sweep:
        alone = baselines.eap_ig(model, data, steps=item.details["steps"], batch_size=3, riemann=riemann)
        torch.testing.assert_close(item.scores, alone.scores, atol=1e-6, rtol=0)
        assert (item.forward_passes, item.backward_passes) == (alone.forward_passes, alone.backward_passes)
        assert item.details["shared_run"]["forward_passes"] == 5 * len(data)  # what the shared run cost
    endpoint = "clean" if riemann == "right" else "corrupt"
    attribution = baselines.attribution_patching(model, data, "hooks", batch_size=3, endpoint=endpoint)
    torch.testing.assert_close(sweep[0].scores, attribution.scores, atol=1e-6, rtol=0)
    assert (sweep[2].scores - sweep[1].scores).abs().max() > 1e-4  # the counts are not one number
    assert sweep[0].seconds <= sweep[1].seconds <= sweep[2].seconds  # more points never cost less
    assert [item.details["steps"] for item in baselines.eap_ig_sweep(model, data, (4, 1, 4))] == [1, 4]
    with pytest.raises(InputError, match=r"divide the largest \(4\).*\[3\]"):
        baselines.eap_ig_sweep(model, data, steps=(3, 4))
    for bad in ("12", 2.0, None, (1, True)):
        with pytest.raises(InputError, match="steps"):
            baselines.eap_ig_sweep(model, data, steps=bad)
    with pytest.raises(InputError, match="at least one"):
        baselines.eap_ig_sweep(model, data, steps=())
