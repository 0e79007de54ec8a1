"""Built-in tasks and task_accuracy: data layout, determinism, clear errors, and a real model above chance."""

from __future__ import annotations

import pytest
import torch
from models_for_tests import WORDS, word_model

from chg_tlens import HeadGates
from chg_tlens.analysis.accuracy import task_accuracy
from chg_tlens.errors import InputError
from chg_tlens.tasks import TASKS, function_views, induction, ioi, make_task, sva
from chg_tlens.tasks.function import is_held_out

TEXT_TASKS = ["ioi", "sva", "aba_abb", "arithmetic", "function"]
TWIN_TASKS = ["ioi", "sva", "aba_abb", "arithmetic"]
SINGLE_TOKEN_TASKS = ["ioi", "sva", "aba_abb"]


# ----------------------------------------------------------------- no real model needed
def test_registry_names_every_task_and_rejects_unknown_names(recall):
    assert set(TASKS) == {"ioi", "sva", "induction", "aba_abb", "arithmetic", "function"}
    with pytest.raises(ValueError, match="unknown task 'iox'.*'ioi'.*'function'"):
        make_task("iox", recall.model)
    with pytest.raises(ValueError, match="no option.*'seq_length'.*seq_len"):
        make_task("induction", recall.model, seq_length=4)


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_tasks_say_they_need_a_tokenizer(recall, name):
    with pytest.raises(ValueError, match=f"'{name}' task.*needs a tokenizer"):
        make_task(name, recall.model, n=4)


def test_tasks_reject_bad_options_by_name(repeat):
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        induction(repeat.model, n=0)
    with pytest.raises(ValueError, match="seq_len=10 .* 21 tokens.*n_ctx=16.*seq_len <= 7"):
        induction(repeat.model, seq_len=10)
    with pytest.raises(InputError, match="expected a TransformerLens model"):
        induction("gpt2")


def test_induction_on_a_planted_repeat_model(repeat):
    """The planted repeat circuit copies from ``period - 1`` back: it must solve every target."""
    data = induction(repeat.model, n=24, seed=3, seq_len=4)
    assert data.tokens.shape == (24, 9)
    assert (data.tokens[:, 0] == 0).all() and (data.tokens[:, 1:] > 0).all()  # BOS 0, never drawn
    assert torch.equal(data.tokens[:, 1:5], data.tokens[:, 5:])
    expected_mask = torch.zeros(9, dtype=torch.bool)
    expected_mask[6:] = True  # the repeat, minus its unpredictable first token
    assert (data.target_mask == expected_mask).all()
    twin = data.corrupt
    assert twin.tokens.shape == data.tokens.shape and torch.equal(twin.target_mask, data.target_mask)
    assert torch.equal(twin.tokens[:, :5], data.tokens[:, :5])
    assert (twin.tokens[:, 5:] != data.tokens[:, 5:]).any()
    assert data.meta["task"] == "induction" and data.meta["options"]["seq_len"] == 4

    clean = task_accuracy(repeat.model, data, batch_size=10)
    assert clean["accuracy"] == 1.0 and clean["token_accuracy"] == 1.0
    assert task_accuracy(repeat.model, twin)["token_accuracy"] < 0.5
    assert "contrast_accuracy" not in clean  # several targets per example: no single-answer contrast


def test_induction_is_deterministic_by_seed(repeat):
    first, again = induction(repeat.model, n=16, seed=5, seq_len=4), induction(repeat.model, n=16, seed=5,
                                                                               seq_len=4)
    other = induction(repeat.model, n=16, seed=6, seq_len=4)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.corrupt.tokens, again.corrupt.tokens)
    assert not torch.equal(first.tokens, other.tokens)


def test_task_accuracy_follows_the_gates(recall):
    """Closing the planted facilitating head must cost accuracy; gates of 1 cost nothing."""
    data = recall.data(48, seed=1)
    plain = task_accuracy(recall.model, data)
    ones = task_accuracy(recall.model, data, gates=HeadGates.fixed(torch.ones(1, 4)))
    assert plain["accuracy"] == 1.0 and ones == plain
    values = torch.ones(2, 1, 4)
    values[1, 0, 0] = 0.0  # mask 1 closes the facilitating head 0.0
    both = task_accuracy(recall.model, data, batch_size=7, gates=HeadGates.fixed(values))
    assert both["accuracy"][0] == 1.0 and both["accuracy"][1] < 0.3
    assert both["logprob"][1] < both["logprob"][0] - 1.0
    with pytest.raises(ValueError, match="gates: built for 2 layers x 4 heads.*1 x 4"):
        task_accuracy(recall.model, data, gates=HeadGates.fixed(torch.ones(2, 4)))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        task_accuracy(recall.model, data, batch_size=0)


def test_words_outside_a_small_vocabulary_are_refused():
    model = word_model()
    with pytest.raises(ValueError, match=r"' bob' is not in the vocabulary"):
        ioi(model, names=[" mary", " john", " bob"])
    with pytest.raises(ValueError, match="sva: needs at least 2 noun pairs made of single tokens.*found 1"):
        sva(model, nouns=None, verbs=(" is", " are"))


def test_ioi_groups_each_prompt_by_its_template_and_other_tasks_have_none(repeat):
    """Mean ablation's reference: each ioi prompt's group is the index of the template that built it
    (an equal template shares it), read back from the prompt's own words. Rejects groups not drawn with
    the prompt (shuffled), a group per template slot (equal templates apart), and ids on the twin."""
    model = word_model(n_ctx=24, words=[*WORDS, "bob", "then"])
    templates = ["when {first} and {second} went to the {place} {subject} gave a {object} to",
                 "then {first} and {second} went to the {place} and {subject} gave a {object} to"]
    data = ioi(model, n=16, seed=0, names=[" mary", " john", " bob"], templates=[*templates, templates[0]])
    from_words = [0 if prompt.startswith("when") else 1 for prompt in data.meta["prompts"]]
    assert data.groups.tolist() == from_words and set(from_words) == {0, 1}
    assert data.corrupt.groups is None
    assert induction(repeat.model, n=4, seed=0, seq_len=4).groups is None


# ----------------------------------------------------------------- the real SmolLM2-135M
@pytest.fixture(scope="module")
def smollm2():
    from chg_tlens.models.load import load_model

    return load_model("smollm2-135m")


@pytest.mark.real_model
def test_single_token_check_names_the_word_that_splits(smollm2):
    with pytest.raises(ValueError, match=r"' Bartholomew' splits into 3 tokens"):
        ioi(smollm2, names=[" Mary", " John", " Bartholomew"])
    with pytest.raises(ValueError, match=r"' Zebedees' splits into"):
        sva(smollm2, nouns=[(" key", " keys"), (" Zebedee", " Zebedees")])


@pytest.mark.real_model
@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_tasks_are_seeded_and_mark_exactly_the_answer(smollm2, name):
    data = make_task(name, smollm2, n=12, seed=0)
    assert torch.equal(data.tokens, make_task(name, smollm2, n=12, seed=0).tokens)
    assert not torch.equal(data.tokens, make_task(name, smollm2, n=12, seed=1).tokens)
    assert data.meta["task"] == name and data.meta["seed"] == 0 and len(data.meta["answers"]) == 12
    tokenizer = smollm2.tokenizer
    for i, answer in enumerate(data.meta["answers"]):
        marked = data.tokens[i][data.target_mask[i]].tolist()
        assert marked == tokenizer(answer, add_special_tokens=False)["input_ids"]
        end = int(data.lengths[i])
        assert data.target_mask[i, :end].nonzero().flatten().tolist() == list(range(end - len(marked), end))
        assert tokenizer.decode(data.tokens[i, : end - len(marked)]).endswith(data.meta["prompts"][i])
    if name in SINGLE_TOKEN_TASKS:
        assert (data.target_mask.sum(dim=1) == 1).all()


@pytest.mark.real_model
@pytest.mark.parametrize("name", TWIN_TASKS)
def test_corrupt_twins_match_the_clean_layout_and_change_the_answer(smollm2, name):
    data = make_task(name, smollm2, n=12, seed=2)
    twin = data.corrupt
    assert twin is not None
    assert twin.tokens.shape == data.tokens.shape and torch.equal(twin.lengths, data.lengths)
    assert torch.equal(twin.target_mask, data.target_mask)
    answers_differ = [a != b for a, b in zip(data.meta["answers"], twin.meta["answers"], strict=True)]
    assert all(answers_differ)
    prompt_differs = (twin.tokens != data.tokens) & ~data.target_mask
    assert prompt_differs.any(dim=1).all()  # every twin changed its prompt, not only its answer
    if name in SINGLE_TOKEN_TASKS:
        assert (prompt_differs.sum(dim=1) <= 2 * 4).all()  # a few answer-carrying tokens, not a new prompt


@pytest.mark.real_model
def test_function_views_are_matched_and_splits_are_held_out(smollm2):
    views = function_views(smollm2, n=10, seed=0, function="capital", split="test")
    in_context, instruction = views
    assert in_context.meta["answers"] == instruction.meta["answers"]
    for i in range(10):
        assert torch.equal(in_context.tokens[i][in_context.target_mask[i]],
                           instruction.tokens[i][instruction.target_mask[i]])
    assert instruction.meta["prompts"][0].startswith("Give the capital city of the country.\nCountry: ")
    assert "->" in in_context.meta["prompts"][0] and "capital" not in in_context.meta["prompts"][0]
    queries = [p.splitlines()[-1].removesuffix(" ->") for p in in_context.meta["prompts"]]
    assert all(is_held_out(q, 0.3) for q in queries)
    shots = {line.split(" ->")[0] for p in in_context.meta["prompts"] for line in p.splitlines()[:-1]}
    assert not any(is_held_out(s, 0.3) for s in shots)  # in-context examples come from train items
    train = function_views(smollm2, n=30, seed=0, function="capital", split="train").in_context
    assert not {p.splitlines()[-1] for p in train.meta["prompts"]} & {p.splitlines()[-1]
                                                                       for p in in_context.meta["prompts"]}
    contrast = views.contrastive(retain="instruction")
    assert contrast.forget is not None and torch.equal(contrast.tokens, instruction.tokens)
    assert torch.equal(contrast.forget.tokens, in_context.tokens)


@pytest.mark.real_model
def test_smollm2_does_the_tasks_well_above_chance(smollm2):
    """Thresholds sit well below what SmolLM2-135M scores at n=100 (see the report) and well above chance.

    Chance: binary choices (IO vs subject, are vs is, A vs B) 0.5; a random token of a 49k vocabulary
    has log-prob -10.8; a two-digit sum guessed from the ~40 plausible ones 0.025.
    """
    runs = {"ioi": ("ioi", {}), "sva": ("sva", {}), "sva_plain": ("sva", {"attractor": "none"}),
            "induction": ("induction", {}), "aba": ("aba_abb", {}), "arithmetic": ("arithmetic", {}),
            "plural_icl": ("function", {"function": "plural"}),
            "capital_instruction": ("function", {"function": "capital", "view": "instruction"})}
    scores = {key: task_accuracy(smollm2, make_task(name, smollm2, n=32, seed=0, **options), batch_size=32)
              for key, (name, options) in runs.items()}
    assert scores["ioi"]["contrast_accuracy"] >= 0.8 and scores["ioi"]["logit_diff"] > 2.0
    assert scores["sva"]["logit_diff"] > 0.3  # across an attractor of the other number: harder
    assert scores["sva_plain"]["contrast_accuracy"] >= 0.85 and scores["sva_plain"]["logit_diff"] > 1.5
    assert scores["induction"]["token_accuracy"] >= 0.25 and scores["induction"]["logprob"] > -7.0
    assert scores["aba"]["contrast_accuracy"] >= 0.6 and scores["aba"]["logit_diff"] > 1.0
    assert scores["arithmetic"]["accuracy"] >= 0.12
    assert scores["plural_icl"]["accuracy"] >= 0.8
    assert scores["capital_instruction"]["accuracy"] >= 0.6


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["abstract", "token"])
def test_symbol_pairs_on_smollm2_share_their_layout(smollm2, kind):
    """SmolLM2 splits some words in two at a line start but not after a space: pairs whose two contexts
    would put the answer at different positions must be redrawn, not built (they used to raise)."""
    from chg_tlens.tasks.aba_abb import paired_contexts

    pairs = paired_contexts(smollm2, n=12, seed=0, kind=kind)
    assert torch.equal(pairs.source.lengths, pairs.target.lengths)
    assert torch.equal(pairs.source.target_mask, pairs.target.target_mask)
    assert (pairs.item_positions.sum(dim=1) == 4).all()  # the third word of each of the 4 example lines
