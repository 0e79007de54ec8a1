"""Validation tools on planted circuits, where the direction of every effect is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chg_tlens import CHGConfig, GateData, fit_chg
from chg_tlens.analysis.validate import (
    ablation_curve,
    evaluate_gates,
    logit_diff_metric,
    mediation_test,
    necessity,
    patching_scores,
    path_patching,
    path_patching_scores,
    silent_patching_progress,
    sufficiency,
    target_logprob_metric,
)
from chg_tlens.models.adapter import build_native_model, head_weights
from chg_tlens.testbeds.planted import PlantedHead, build_planted_model

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

SMALL = dict(n_seeds=3, steps=150, batch_size=32, progress=False)
VOCAB, N_CTX, SEQ_LEN = 10, 16, 8


# ---------------------------------------------------------------------- planted models built here
def recall_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recall task (last token = token at position 1) and a corrupt twin with another token there."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(n, SEQ_LEN))
    tokens[:, 0] = 0
    tokens[:, -1] = tokens[:, 1]
    corrupt = tokens.copy()
    corrupt[:, 1] = corrupt[:, 1] % (VOCAB - 1) + 1
    corrupt[:, -1] = corrupt[:, 1]
    mask = np.zeros_like(tokens, dtype=bool)
    mask[:, -1] = True
    return torch.as_tensor(tokens), torch.as_tensor(corrupt), torch.as_tensor(mask)


def recall_pair(n: int, seed: int) -> GateData:
    tokens, corrupt, mask = recall_tokens(n, seed)
    return GateData.from_tokens(tokens, mask).with_corrupt(GateData.from_tokens(corrupt, mask))


def repeat_pair(circuit, n: int, seed: int) -> GateData:
    """Repeat task with another block (every token changed), so the targets differ at every position."""
    clean = circuit.data(n, seed)
    corrupt_tokens = clean.tokens % (VOCAB - 1) + 1
    corrupt_tokens[:, 0] = clean.tokens[:, 0]
    return clean.with_corrupt(GateData.from_tokens(corrupt_tokens, clean.target_mask))


def composition_model() -> nn.Module:
    """Two layers, two heads, one real sender -> receiver path through a value input.

    0.0 writes the token at position 1 into scratch; 1.0 attends to its own position, reads scratch
    through its value input and writes it for the answer. 0.1 writes the answer directly; 1.1 writes
    scratch and nothing reads it. So 0.0 -> 1.0 (v) carries all of 0.0's effect, 0.1 acts only directly.
    """
    heads = [
        PlantedHead(0, 0, ("fixed", 1), 0, 3.0),
        PlantedHead(0, 1, ("fixed", 1), +1, 1.5),
        PlantedHead(1, 0, ("offset", 0), +1, 1.0),
        PlantedHead(1, 1, ("offset", 0), 0, 3.0),
    ]
    model = build_planted_model(2, 2, heads, vocab=VOCAB, n_ctx=N_CTX, name="planted-composition")
    scratch = 2 * VOCAB + N_CTX + 1  # token | position | constant | answer | scratch
    value = head_weights(model, 1, 0)["W_V"]  # [d_model, d_head], a view into the model
    with torch.no_grad():
        value[:, :VOCAB] = 0.0
        value[scratch : scratch + VOCAB, :VOCAB] = torch.eye(VOCAB)
    return model


def wide_model() -> nn.Module:
    """Recall task, two layers of four heads: 0.0, 0.3 and 1.2 copy the answer (each needed, none
    sufficient alone), 1.0 writes against it, 0.1 and 1.3 write scratch, 0.2 and 1.1 are empty."""
    heads = [
        PlantedHead(0, 0, ("fixed", 1), +1, 1.5),
        PlantedHead(0, 3, ("fixed", 1), +1, 1.5),
        PlantedHead(1, 2, ("fixed", 1), +1, 1.5),
        PlantedHead(1, 0, ("fixed", 1), -1, 0.5),
        PlantedHead(0, 1, ("fixed", 1), 0, 3.0),
        PlantedHead(1, 3, ("offset", 0), 0, 3.0),
    ]
    return build_planted_model(2, 4, heads, vocab=VOCAB, n_ctx=N_CTX, name="planted-wide")


WIDE_FACILITATING = [(0, 0), (0, 3), (1, 2)]


@pytest.fixture(scope="module")
def recall_fit(recall):
    return fit_chg(recall.model, recall.data(128, 0), CHGConfig(**SMALL))


@pytest.fixture(scope="module")
def repeat_fit(repeat):
    return fit_chg(repeat.model, repeat.data(128, 0), CHGConfig(**SMALL))


@pytest.fixture(scope="module")
def wide():
    model = wide_model()
    return model, fit_chg(model, recall_pair(128, 0), CHGConfig(**SMALL))


@pytest.fixture(scope="module")
def composition():
    return composition_model()


# ---------------------------------------------------------------------- evaluate_gates
def test_evaluate_gates_matches_the_ungated_model_and_the_empty_model(recall):
    data = recall.data(40, 3)
    logprob, accuracy = evaluate_gates(recall.model, data, torch.stack([torch.ones(1, 4), torch.zeros(1, 4)]),
                                       batch_size=16)
    with torch.no_grad():
        logits = recall.model(data.tokens)
    plain = logits[:, -2].log_softmax(-1).gather(-1, data.tokens[:, -1:]).mean()
    assert logprob[0] == pytest.approx(float(plain), abs=1e-5)
    correct = (logits[:, -2].argmax(-1) == data.tokens[:, -1]).float().mean()
    assert accuracy[0] == pytest.approx(float(correct))
    # No head writes the answer: the logits are all zero, so every token has probability 1/vocab.
    assert logprob[1] == pytest.approx(-np.log(VOCAB), abs=1e-5)


def test_evaluate_gates_refuses_gates_of_another_shape(recall):
    with pytest.raises(ValueError, match=r"gate_values.*1 x 4.*\[2, 4\]"):
        evaluate_gates(recall.model, recall.data(8, 0), torch.ones(2, 4))


# ---------------------------------------------------------------------- targeted ablation
@pytest.mark.parametrize("name", ["recall", "repeat"])
def test_ablation_curves_move_in_each_roles_direction(name, request):
    circuit = request.getfixturevalue(name)
    result = request.getfixturevalue(f"{name}_fit")
    data = circuit.data(64, 7)
    n_irrelevant = len(circuit.heads_with_role("irrelevant"))
    frame = ablation_curve(circuit.model, data, result, ["facilitating", "interfering", "irrelevant"])

    def step(score: str, value: float, k: int) -> float:
        row = frame[(frame.score == score) & (frame.value == value) & (frame.n_changed == k)]
        return float(row.delta_logprob.iloc[0])

    # From G+: closing the top facilitating head hurts, re-opening the top interfering head hurts,
    # closing every irrelevant head changes nothing.
    assert step("facilitating", 0.0, 1) < -1.0
    assert step("interfering", 1.0, 1) < -0.2
    for k in range(1, n_irrelevant + 1):
        assert abs(step("irrelevant", 0.0, k)) < 0.05
    top = frame[(frame.score == "facilitating") & (frame.n_changed == 1)]
    assert (int(top["layer"].iloc[0]), int(top["head"].iloc[0])) == circuit.heads_with_role("facilitating")[0]
    # From the full model: closing the top interfering head helps.
    rise = ablation_curve(circuit.model, data, result, "interfering", values=(0.0,), start="ones")
    assert float(rise[rise.n_changed == 1].delta_logprob.iloc[0]) > 0.2


def test_ablation_curve_frame_layout_and_custom_scores(repeat, repeat_fit):
    data = repeat.data(32, 1)
    frame = ablation_curve(repeat.model, data, repeat_fit, "facilitating", seed=1, values=(0.0, 0.5, 1.0),
                           max_heads=3)
    assert len(frame) == 3 * 4
    start = frame[frame.n_changed == 0]
    assert (start.delta_logprob == 0).all() and start.layer.isna().all()
    assert len(set(start.logprob)) == 1
    ordered = frame[(frame.value == 0.0) & (frame.n_changed > 0)].score_value.to_numpy()
    assert (np.diff(ordered) <= 0).all()
    assert (frame.seed == 1).all()
    # Any [layer, head] score ranks heads: here head 0.0 first, then 1.3.
    custom = torch.zeros(2, 4)
    custom[0, 0], custom[1, 3] = 2.0, 1.0
    frame = ablation_curve(repeat.model, data, repeat_fit, custom, values=(0.0,), max_heads=2, label="mine")
    changed = frame[frame.n_changed > 0]
    assert list(zip(changed["layer"], changed["head"], strict=True)) == [(0, 0), (1, 3)]
    assert (frame.score == "mine").all()


def test_ablation_curve_refuses_bad_input(recall, recall_fit, repeat_fit):
    data = recall.data(8, 0)
    with pytest.raises(ValueError, match="score: expected one of"):
        ablation_curve(recall.model, data, recall_fit, "helpful")
    with pytest.raises(ValueError, match=r"values: .*\[0, 1\]"):
        ablation_curve(recall.model, data, recall_fit, values=(2.0,))
    with pytest.raises(ValueError, match="another model"):
        ablation_curve(recall.model, data, repeat_fit)
    with pytest.raises(ValueError, match="seed"):
        ablation_curve(recall.model, data, recall_fit, seed=3)
    with pytest.raises(ValueError, match="score: a score tensor"):
        ablation_curve(recall.model, data, recall_fit, torch.zeros(2, 2))


def test_ablation_curves_figure_draws_one_line_per_curve(recall, recall_fit):
    from chg_tlens.app.plot import ablation_curves

    frame = ablation_curve(recall.model, recall.data(16, 0), recall_fit, ["facilitating", "irrelevant"])
    ax = ablation_curves(frame).axes[0]
    assert len(ax.get_lines()) == 4 + 1  # four curves and the zero line
    assert ax.get_lines()[0].get_ydata()[0] == 0.0
    with pytest.raises(ValueError, match="missing"):
        ablation_curves(frame.drop(columns=["n_changed"]))


# ---------------------------------------------------------------------- sufficiency and necessity
@pytest.mark.parametrize("name", ["recall", "repeat"])
def test_facilitating_heads_are_sufficient_and_necessary_beyond_random_sets(name, request):
    circuit = request.getfixturevalue(name)
    result = request.getfixturevalue(f"{name}_fit")
    data = circuit.data(64, 5)
    kept = sufficiency(circuit.model, data, result, n_random=8).set_index("condition")
    removed = necessity(circuit.model, data, result, n_random=8).set_index("condition")
    assert kept.loc["circuit", "n_heads"] == len(circuit.heads_with_role("facilitating"))
    assert len(kept.loc["random"]) == 8
    assert (kept.loc["random", "n_heads"] == kept.loc["circuit", "n_heads"]).all()
    # Keeping only the circuit does at least as well as the full model (its interfering head is gone)...
    assert kept.loc["circuit", "logprob"] >= kept.loc["full model", "logprob"] - 1e-4
    assert kept.loc["circuit", "logprob"] > kept.loc["random", "logprob"].mean() + 0.5
    assert kept.loc["circuit", "accuracy"] == 1.0
    # ...and removing it is worse than removing random sets of the same size.
    assert removed.loc["circuit", "logprob"] < removed.loc["random", "logprob"].mean() - 0.5
    assert removed.loc["circuit", "logprob"] < removed.loc["full model", "logprob"] - 1.0


def test_sufficiency_takes_explicit_heads_and_is_reproducible(wide):
    model, _ = wide
    data = recall_pair(32, 2)
    a = sufficiency(model, data, heads=WIDE_FACILITATING, n_random=4, rng_seed=3)
    b = sufficiency(model, data, heads=WIDE_FACILITATING, n_random=4, rng_seed=3)
    assert a.equals(b)
    assert a.set_index("condition").loc["circuit", "accuracy"] == 1.0
    with pytest.raises(ValueError, match="give a CHGResult"):
        necessity(model, data)
    with pytest.raises(ValueError, match=r"heads: heads \[\(2, 0\)\] lie outside"):
        necessity(model, data, heads=[(2, 0)])


# ---------------------------------------------------------------------- activation patching
@pytest.mark.parametrize("name", ["recall", "repeat"])
def test_patching_scores_have_each_roles_sign(name, request):
    circuit = request.getfixturevalue(name)
    data = recall_pair(32, 1) if name == "recall" else repeat_pair(circuit, 32, 1)
    scores = patching_scores(circuit.model, data)
    assert scores.shape == (circuit.model.cfg.n_layers, circuit.model.cfg.n_heads)
    roles = circuit.true_roles()
    assert (scores[torch.as_tensor(roles == "facilitating")] > 0.3).all()
    assert (scores[torch.as_tensor(roles == "interfering")] < -0.1).all()
    assert scores[torch.as_tensor(roles == "irrelevant")].abs().max() < 1e-4
    # The logit-difference metric agrees in sign.
    diff = patching_scores(circuit.model, data, metric=logit_diff_metric(data, data.corrupt))
    assert torch.equal(diff.sign(), scores.sign())


def test_patching_scores_equal_a_hand_made_hook_z_patch(recall):
    data = recall_pair(16, 4)
    model, metric = recall.model, target_logprob_metric(data)
    raw = patching_scores(model, data, normalize=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens, names_filter=["blocks.0.attn.hook_z"])

        def put_clean_head_0(z, hook):
            z = z.clone()
            z[:, :, 0] = cache["blocks.0.attn.hook_z"][:, :, 0]
            return z

        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", put_clean_head_0)]):
            by_hand = float(metric(model(data.corrupt.tokens)))
        clean, corrupt = float(metric(model(data.tokens))), float(metric(model(data.corrupt.tokens)))
    assert float(raw[0, 0]) == pytest.approx(by_hand, abs=1e-5)
    normalized = patching_scores(model, data)
    assert float(normalized[0, 0]) == pytest.approx((by_hand - corrupt) / (clean - corrupt), abs=1e-5)


def test_silent_patching_progress_hides_transformer_lens_bars_and_restores_them(recall, capsys):
    from transformer_lens import patching

    data = recall_pair(8, 5)
    original = patching.tqdm
    loud = patching_scores(recall.model, data)
    drawn = capsys.readouterr().err
    with silent_patching_progress():
        quiet = patching_scores(recall.model, data)
    assert "it/s" in drawn or "%" in drawn, "TransformerLens drew no bar, so this test checks nothing"
    assert capsys.readouterr().err == ""
    assert torch.equal(loud, quiet)
    assert patching.tqdm is original


def test_patching_refuses_missing_or_misshapen_corrupt_data(recall):
    tokens, _, mask = recall_tokens(8, 0)
    clean = GateData.from_tokens(tokens, mask)
    with pytest.raises(ValueError, match="corrupt: the data has no corrupt twin"):
        patching_scores(recall.model, clean)
    short_mask = torch.zeros(8, SEQ_LEN - 1, dtype=torch.bool)
    short_mask[:, -1] = True
    short = GateData.from_tokens(tokens[:, :-1], short_mask)
    with pytest.raises(ValueError, match="corrupt: the corrupt twin has tokens of shape"):
        patching_scores(recall.model, clean, short)
    with pytest.raises(ValueError, match="same on clean and corrupt"):
        patching_scores(recall.model, clean, clean)


# ---------------------------------------------------------------------- path patching
def test_path_patching_finds_the_path_that_exists_and_no_other(composition):
    data = recall_pair(32, 0)

    def effect(senders, receivers, receiver_input="v"):
        result = path_patching(composition, data, None, senders, receivers, receiver_input=receiver_input)
        return result.effect

    through_value = effect([(0, 0)], [(1, 0)])
    assert through_value > 0.3
    assert effect([(0, 0)], [(1, 0)], "z") == pytest.approx(through_value, abs=1e-6)
    for senders, receivers, receiver_input in [
        ([(0, 0)], [(1, 0)], "q"),   # 1.0 attends by position: its query ignores 0.0
        ([(0, 0)], [(1, 1)], "v"),   # 1.1 reads tokens, not scratch
        ([(0, 1)], [(1, 0)], "v"),   # 0.1 writes the answer subspace, which 1.0 does not read
        ([(0, 0)], "logits", "v"),   # 0.0 has no direct path to the output
    ]:
        assert abs(effect(senders, receivers, receiver_input)) < 1e-6, (senders, receivers)
    assert effect([(0, 1)], "logits") > 0.05


def test_path_patching_carries_all_of_a_senders_effect_when_it_has_one_route(composition):
    data = recall_pair(32, 0)
    result = path_patching(composition, data, data.corrupt, [(0, 0)], [(1, 0)])
    metric = target_logprob_metric(data)
    with torch.no_grad():
        _, cache = composition.run_with_cache(data.corrupt.tokens, names_filter=["blocks.0.attn.hook_z"])

        def corrupt_sender(z, hook):
            z = z.clone()
            z[:, :, 0] = cache["blocks.0.attn.hook_z"][:, :, 0]
            return z

        with composition.hooks(fwd_hooks=[("blocks.0.attn.hook_z", corrupt_sender)]):
            noised = float(metric(composition(data.tokens)))
    assert result.patched == pytest.approx(noised, abs=1e-5)
    assert result.clean > result.patched > result.corrupt
    assert result.effect == pytest.approx((noised - result.clean) / (result.corrupt - result.clean), abs=1e-6)


def test_path_patching_scores_map_the_receivers(composition):
    """Each measured receiver's entry is its own path-patching effect: 1.0 reads 0.0's scratch through
    its value, 1.1 reads tokens and the queries read positions, so only 1.0 through v moves."""
    data = recall_pair(32, 0)
    scores = path_patching_scores(composition, data, None, [(0, 0)])
    single = path_patching(composition, data, None, [(0, 0)], [(1, 0)]).effect
    assert scores.shape == (2, 2)
    assert float(scores[1, 0]) > 0.3
    assert float(scores[1, 0]) == pytest.approx(single, abs=1e-6)
    assert abs(float(scores[1, 1])) < 1e-6
    by_query = path_patching_scores(composition, data, None, [(0, 0)], receiver_input="q")
    assert by_query[1].abs().max() < 1e-6
    # 0.1 writes the answer subspace, which neither receiver's value reads.
    assert path_patching_scores(composition, data, None, [(0, 1)])[1].abs().max() < 1e-6


def test_path_patching_refuses_bad_heads_and_runs_on_grouped_query_models(composition):
    data = recall_pair(8, 0)
    with pytest.raises(ValueError, match="also senders"):
        path_patching(composition, data, None, [(0, 0)], [(0, 0)])
    with pytest.raises(ValueError, match="receivers: expected a list"):
        path_patching(composition, data, None, [(0, 0)], "residual")
    with pytest.raises(ValueError, match="senders: expected at least one"):
        path_patching(composition, data, None, [], [(1, 0)])
    with pytest.raises(ValueError, match="receiver_input"):
        path_patching(composition, data, None, [(0, 0)], [(1, 0)], receiver_input="o")
    gqa = build_native_model(d_model=32, d_head=8, n_layers=2, n_ctx=16, n_heads=4, n_key_value_heads=2,
                             d_vocab=VOCAB, attn_only=True, normalization_type=None, seed=0)
    for kind in ("q", "k", "v"):  # keys and values too: the heads sharing them are held clean
        assert np.isfinite(path_patching(gqa, data, None, [(0, 0)], [(1, 0)], receiver_input=kind).patched)


# ---------------------------------------------------------------------- mediation vs CHG
def test_heads_flagged_by_patching_have_higher_facilitation(wide):
    model, result = wide
    scores = patching_scores(model, recall_pair(32, 1))
    flagged = [(int(a), int(b)) for a, b in torch.nonzero(scores > 0.1)]
    assert flagged == WIDE_FACILITATING
    test = mediation_test(result, flagged)
    assert test["t"] > 5 and test["p"] < 0.01
    assert test["n_flagged"] == 3 and test["n_rest"] == 5
    assert test["facilitation_flagged"] > test["facilitation_rest"]
    assert test["spearman_rho"] is None
    with_scores = mediation_test(result, scores, top_k=3)
    assert with_scores["t"] == pytest.approx(test["t"])
    assert with_scores["spearman_rho"] > 0.7
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for layer, head in flagged:
        mask[layer, head] = True
    assert mediation_test(result, mask)["t"] == pytest.approx(test["t"])


def test_mediation_test_reports_no_support_for_the_wrong_heads(wide):
    _, result = wide
    scratch_writers = [(0, 1), (1, 3)]
    test = mediation_test(result, scratch_writers, seed_reduce="mean")
    assert test["t"] < 0
    assert mediation_test(result, scratch_writers, seed_reduce=0)["facilitation_flagged"] < 0.1


def test_mediation_test_refuses_groups_too_small_for_a_t_test(wide):
    _, result = wide
    with pytest.raises(ValueError, match="at least two flagged heads"):
        mediation_test(result, [(0, 0)])
    with pytest.raises(ValueError, match=r"\[layer, head\] = \[2, 4\]"):
        mediation_test(result, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="seed_reduce"):
        mediation_test(result, WIDE_FACILITATING, seed_reduce="median")


# ---------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm():
    from chg_tlens.models.load import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.mark.real_model
def test_path_patching_and_gate_evaluation_run_on_the_real_grouped_query_model(smollm):
    from chg_tlens.tasks import make_task

    data = make_task("ioi", smollm, n=2, seed=0)
    # Rotary, grouped-query attention: the whole last layer of heads as senders to the output...
    senders = [(29, head) for head in range(9)]
    direct = path_patching(smollm, data, None, senders, "logits")
    assert direct.clean > direct.corrupt and np.isfinite(direct.effect)
    assert direct.patched != pytest.approx(direct.clean, abs=1e-4)
    # ...queries are receivers, and values (shared by 3 query heads) too, in one layer at a time.
    through_query = path_patching(smollm, data, None, [(0, 0), (0, 1)], [(29, 0), (29, 1)],
                                  receiver_input="q")
    assert np.isfinite(through_query.effect)
    assert np.isfinite(path_patching(smollm, data, None, [(0, 0)], [(29, 0)], receiver_input="v").effect)
    with pytest.raises(ValueError, match="one layer"):
        path_patching(smollm, data, None, [(0, 0)], [(28, 0), (29, 0)], receiver_input="v")
    logprob, _ = evaluate_gates(smollm, data, torch.ones(30, 9))
    assert float(logprob[0]) == pytest.approx(direct.clean, abs=1e-4)
