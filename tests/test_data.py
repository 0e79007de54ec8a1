"""GateData: which tokens count, checked before any compute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from models_for_tests import WORDS, random_bridge, word_model

from chg_tlens import GateData
from chg_tlens.core.objectives import target_nll
from chg_tlens.errors import InputError
from chg_tlens.models import adapter

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

PROMPT = "when mary and john went to the store john gave a drink to"


@pytest.fixture(scope="module")
def words():
    return word_model()


def test_from_pairs_marks_exactly_the_target_tokens(words):
    data = GateData.from_pairs(words, [PROMPT, "the keys to the cabinet"], [" mary", " are"])
    vocab = {w: i for i, w in enumerate(WORDS)}
    assert data.tokens[0, 0] == vocab["<bos>"]
    first = data.tokens[0, : data.lengths[0]]
    assert first[-1] == vocab["mary"]
    assert data.target_mask[0].nonzero().flatten().tolist() == [int(data.lengths[0]) - 1]
    second_end = int(data.lengths[1]) - 1
    assert data.target_mask[1].nonzero().flatten().tolist() == [second_end]
    assert data.tokens[1, second_end] == vocab["are"]
    assert (data.tokens[1, second_end + 1 :] == data.pad_token_id).all()


def test_from_text_counts_every_next_token(words):
    data = GateData.from_text(words, ["the keys are", "mary and john went"])
    assert data.target_mask[0].tolist()[:4] == [False, True, True, True]
    assert data.n_targets == 3 + 4


def test_from_hf_reads_named_fields_and_names_missing_ones(words):
    dataset = Dataset.from_dict({"question": [PROMPT], "answer": [" mary"]})
    data = GateData.from_hf(words, dataset, prompt_field="question", target_field="answer")
    assert data.n_targets == 1
    with pytest.raises(ValueError, match="no field\\(s\\) \\['prompt'\\]"):
        GateData.from_hf(words, dataset, target_field="answer")


def test_bad_inputs_get_clear_errors(words):
    with pytest.raises(ValueError, match="empty"):
        GateData.from_pairs(words, [], [])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        GateData.from_pairs(words, [PROMPT], [""])
    with pytest.raises(ValueError, match="longer than the model's context n_ctx=16"):
        GateData.from_pairs(words, [PROMPT + " and the keys to the cabinet"], [" are"])
    with pytest.raises(ValueError, match="marks no target tokens"):
        GateData.from_tokens(torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match tokens shape"):
        GateData.from_tokens(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="must be bool"):
        GateData.from_tokens(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="integer ids"):
        GateData.from_tokens(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="the dataset is empty"):
        GateData.from_tokens(torch.ones(0, 4, dtype=torch.long), torch.ones(0, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="position 0"):
        GateData.from_tokens(torch.ones(1, 3, dtype=torch.long), torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="example\\(s\\) \\[1\\] have no target"):
        GateData.from_tokens(torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 0, 1], [0, 0, 0]]).bool())
    with pytest.raises(ValueError, match="marks padding"):
        GateData.from_sequences([[1, 2], [1, 2, 3]], [[False, True], [False, True, True]]).__class__(
            torch.ones(1, 3, dtype=torch.long), torch.tensor([[False, False, True]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        GateData.from_pairs(random_bridge(), ["a"], ["b"])
    too_big = GateData.from_tokens(torch.full((1, 3), 99), torch.tensor([[False, True, True]]))
    with pytest.raises(ValueError, match="token ids must lie in \\[0, 20\\)"):
        too_big.checked_for(random_bridge())


def test_batches_are_seeded_and_cover_every_example():
    data = GateData.from_tokens(torch.arange(20).reshape(10, 2), torch.tensor([[False, True]] * 10))
    first = [b.tokens[:, 0].tolist() for b, _ in zip(data.batches(5, seed=3), range(4), strict=False)]
    again = [b.tokens[:, 0].tolist() for b, _ in zip(data.batches(5, seed=3), range(4), strict=False)]
    other = [b.tokens[:, 0].tolist() for b, _ in zip(data.batches(5, seed=4), range(4), strict=False)]
    assert first == again and first != other
    assert sorted(first[0] + first[1]) == list(range(0, 20, 2))
    assert data.batch_indices(3, 5, seed=3).tolist() == [x // 2 for x in first[3]]
    wide = data.batch_indices(0, 25, seed=1)  # larger than the data: wraps into the next epoch
    assert len(wide) == 25 and sorted(wide[:10].tolist()) == list(range(10))


def _contrastive(forget_filler: int) -> GateData:
    tokens = torch.tensor([[1, 2, 5], [3, 4, 6]])
    mask = torch.tensor([[False, False, True], [False, False, True]])
    retain = GateData.from_tokens(tokens, mask)
    forget_tokens = tokens.clone()
    forget_tokens[:, 0] = forget_filler  # same answers, posed differently
    return GateData.contrastive(retain, GateData.from_tokens(forget_tokens, mask))


def test_fingerprint_sees_the_forget_twin_the_lengths_and_the_pad_id():
    base = _contrastive(7)
    assert base.fingerprint() == _contrastive(7).fingerprint()
    assert base.fingerprint() != _contrastive(8).fingerprint()  # other forget data
    short = GateData.from_tokens(base.tokens, base.target_mask, lengths=torch.tensor([3, 3]))
    shorter = GateData.from_tokens(base.tokens, base.target_mask, lengths=torch.tensor([3, 3]),
                                   pad_token_id=9)
    assert short.fingerprint() != shorter.fingerprint()
    longer = GateData.from_tokens(torch.cat([base.tokens, torch.zeros(2, 1, dtype=torch.long)], 1),
                                  torch.cat([base.target_mask, torch.zeros(2, 1, dtype=torch.bool)], 1),
                                  lengths=torch.tensor([3, 3]))
    trailing = GateData.from_tokens(longer.tokens, longer.target_mask, lengths=torch.tensor([3, 4]))
    assert longer.fingerprint() != trailing.fingerprint()  # other lengths, same tokens and mask
    assert base.fingerprint() != GateData.from_tokens(base.tokens, base.target_mask).fingerprint()
    assert base.with_corrupt(base.forget).fingerprint() != base.fingerprint()
    swapped = GateData.from_tokens(base.tokens, base.target_mask).with_corrupt(base.forget)
    assert swapped.fingerprint() != base.fingerprint()  # the same twin as corrupt, not forget


def test_gate_data_compares_by_identity_and_hashes():
    data, copy = _contrastive(7), _contrastive(7)
    assert data == data and data != copy
    assert len({data, copy, data}) == 2 and hash(data) == hash(data)


ragged = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=6
)


@settings(max_examples=40, deadline=None)
@given(ragged, st.integers(0, 2**16))
def test_masks_never_mark_prompt_or_padding(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    sequences, masks = [], []
    for prompt_len, target_len in shapes:
        sequences.append(torch.randint(1, 19, (prompt_len + target_len,), generator=generator).tolist())
        masks.append([False] * prompt_len + [True] * target_len)
    data = GateData.from_sequences(sequences, masks, pad_token_id=0)
    for i, (prompt_len, target_len) in enumerate(shapes):
        row = data.target_mask[i]
        assert not row[:prompt_len].any()
        assert row[prompt_len : prompt_len + target_len].all()
        assert not row[prompt_len + target_len :].any()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**16))
def test_padding_never_changes_an_examples_loss(extra_pad, seed):
    model = _small_model()
    generator = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 20, (6,), generator=generator).tolist()
    mask = [False, False, False, True, True, True]
    alone = GateData.from_sequences([seq], [mask])
    longer = GateData.from_sequences([seq, seq[:3] + [1] * (3 + extra_pad)],
                                     [mask, [False, False, False] + [True] * (3 + extra_pad)])
    with torch.no_grad():
        nll_alone = target_nll(model(alone.tokens), alone.tokens, alone.target_mask)
        nll_padded = target_nll(model(longer.tokens)[:1], longer.tokens[:1], longer.target_mask[:1])
    assert longer.tokens.shape[1] > alone.tokens.shape[1]
    assert torch.allclose(nll_alone, nll_padded, atol=1e-5)


_cached = {}


def _small_model():
    if "model" not in _cached:
        _cached["model"] = random_bridge()
    return _cached["model"]


NO_PROMPT_FIELD = "no field\\(s\\) \\['prompt', 'target'\\]; its fields are \\['answer', 'question'\\]"


@pytest.mark.parametrize("name, content, message", [
    ("pairs.jsonl", '{"question": "the keys to the cabinet", "answer": " are"}\n', NO_PROMPT_FIELD),
    ("pairs.csv", "question,answer\nthe keys to the cabinet, are\n", NO_PROMPT_FIELD),
    ("broken.jsonl", '{"prompt": "the keys", "target": " are"}\n{"prompt": \n', "broken.jsonl, line 2"),
    ("empty.jsonl", "\n", "holds no records"),
    ("pairs.txt", "the keys are", "unknown data format '.txt'"),
    ("list.json", '[1, 2]', "expected a list of records"),
])
def test_data_files_with_problems_are_named(words, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        GateData.from_file(words, path)
    assert name in str(caught.value)


def test_a_missing_data_file_is_named(words, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        GateData.from_file(words, tmp_path / "nowhere.jsonl")


def test_a_data_file_with_the_named_fields_loads(words, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("question,answer\nthe keys to the cabinet, are\n")
    data = GateData.from_file(words, path, prompt_field="question", target_field="answer")
    assert len(data) == 1 and data.n_targets == 1


@pytest.mark.parametrize("error", [RuntimeError("tokenizer crashed"),
                                   ValueError("an internal error of the tokenizer")])
def test_a_tokenizer_failure_while_reading_a_data_file_propagates_as_itself(tmp_path, monkeypatch, error):
    """Not bad input the user can fix: it must not come back as InputError (a ValueError too)."""
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,target\nthe keys to the cabinet, are\n")
    model = word_model()

    def failing_tokenizer(self: object, text: str, **kwargs: object) -> dict[str, list[int]]:
        raise error

    monkeypatch.setattr(type(model.tokenizer), "__call__", failing_tokenizer)
    with pytest.raises(type(error)) as caught:
        GateData.from_file(model, path)
    assert caught.value is error


@pytest.mark.parametrize("content, message", [
    ("prompt,target\nthe keys to the cabinet,\n", "target 0 \\(''\\) tokenizes to nothing"),
    ("prompt,answer\nthe keys to the cabinet, are\n", "no field\\(s\\) \\['target'\\]"),
])
def test_bad_records_in_a_data_file_name_the_file_and_keep_the_cause(words, tmp_path, content, message):
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as caught:
        GateData.from_file(words, path)
    assert str(caught.value).startswith(f"{path}: ")
    assert isinstance(caught.value.__cause__, InputError) and str(caught.value).endswith(
        str(caught.value.__cause__))


def test_next_token_fingerprints_are_the_ones_recorded_before_per_position_targets():
    """Pinned from the code before ``targets`` existed, so recorded results and checkpoints still match."""
    tokens = torch.tensor([[5, 6, 7, 8], [5, 9, 1, 0]])
    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    data = GateData.from_tokens(tokens, mask, lengths=torch.tensor([4, 3]))
    assert data.fingerprint() == "6a646fe5f5e4dc5d"
    twin = GateData.from_tokens(tokens.flip(1), mask, lengths=torch.tensor([4, 3]))
    assert data.with_corrupt(twin).fingerprint() == "f5bb9bb5d69e5deb"
    labelled = GateData.from_tokens(tokens, mask, lengths=torch.tensor([4, 3]), targets=tokens)
    relabelled = GateData.from_tokens(tokens, mask, lengths=torch.tensor([4, 3]), targets=tokens.flip(1))
    assert len({data.fingerprint(), labelled.fingerprint(), relabelled.fingerprint()}) == 3


def test_per_position_targets_follow_the_data_and_are_checked():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[True, True, False], [False, True, True]])  # position 0 may be scored
    targets = torch.tensor([[7, 8, 0], [0, 9, 1]])
    data = GateData.from_tokens(tokens, mask, targets=targets)
    assert data.per_position and data.labels().tolist() == [7, 8, 9, 1]
    assert data.subset([1]).labels().tolist() == [9, 1]
    stacked = GateData.stack_padded([data, data.subset([0])])
    assert stacked.labels().tolist() == [7, 8, 9, 1, 7, 8]
    plain = GateData.from_tokens(tokens, mask & torch.tensor([False, True, True]))
    with pytest.raises(InputError, match="some parts have per-position targets"):
        GateData.stack_padded([data, plain])
    with pytest.raises(InputError, match="corrupt twin has no per-position targets"):
        data.with_corrupt(plain)
    with pytest.raises(InputError, match="position 0"):
        GateData.from_tokens(tokens, mask)
    with pytest.raises(InputError, match="targets shape"):
        GateData.from_tokens(tokens, mask, targets=targets[:, :2])
    with pytest.raises(InputError, match="targets must be integer ids"):
        GateData.from_tokens(tokens, mask, targets=targets.float())
    with pytest.raises(InputError, match=">= 0"):
        GateData.from_tokens(tokens, mask, targets=-targets - 1)


def test_groups_follow_subsets_and_stacks_are_checked_and_stay_out_of_the_fingerprint():
    """The template id of each example must move with it: rejects a subset that keeps the groups in their
    old order (mean ablation would then average example i over another example's template), a stack
    that drops them, and a fingerprint that hashes them (every fit saved on ioi before groups existed
    would be refused as made on other data)."""
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[False, False, True]] * 3)
    plain = GateData.from_tokens(tokens, mask).with_corrupt(GateData.from_tokens(tokens.flip(1), mask))
    data = plain.with_groups([4, 0, 4])
    assert data.groups.tolist() == [4, 0, 4] and data.corrupt.groups is None
    assert data.subset([1, 2, 0]).groups.tolist() == [0, 4, 4]
    assert data.subset(slice(1, 3)).groups.tolist() == [0, 4]
    # a bool mask picks where it is true (not rows 0 and 1, as its values cast to indices would)
    picked = data.subset(data.groups == 4)
    assert picked.groups.tolist() == [4, 4] and picked.tokens.tolist() == [[1, 2, 3], [7, 8, 9]]
    with pytest.raises(InputError, match=r"bool mask needs one entry per example \(3\)"):
        data.subset(torch.tensor([True, False]))
    assert GateData.stack_padded([data, data.subset([1])]).groups.tolist() == [4, 0, 4, 0]
    assert GateData.stack_padded([data, plain]).groups is None  # ids of one numbering, or none
    assert data.with_groups(None).groups is None and plain.subset([0]).groups is None
    assert GateData.from_tokens(tokens, mask, groups=(1, 1, 2)).groups.dtype == torch.long
    assert data.fingerprint() == plain.fingerprint()
    with pytest.raises(InputError, match=r"one id per example, shape \[3\], got \[2\]"):
        plain.with_groups([0, 1])
    with pytest.raises(InputError, match="groups must be integer ids"):
        plain.with_groups(torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(InputError, match="groups must be one long id per example"):
        replace(plain, groups=torch.tensor([[0, 1, 0]]))


def test_a_bidirectional_model_takes_its_own_output_vocabulary_and_no_padding():
    model = adapter.build_native_model(
        model_name="bidirectional-toy", d_model=16, d_head=4, n_layers=1, n_ctx=8, n_heads=4, d_vocab=10,
        d_vocab_out=3, attn_only=True, normalization_type=None, attention_dir="bidirectional")
    tokens = torch.tensor([[9, 8, 7], [6, 5, 4]])  # input ids past the 3 outputs are fine
    mask = torch.tensor([[False, True, True], [False, True, True]])
    GateData.from_tokens(tokens, mask, targets=torch.full_like(tokens, 2)).checked_for(model)
    with pytest.raises(InputError, match=r"targets must lie in \[0, 3\)"):
        GateData.from_tokens(tokens, mask, targets=torch.full_like(tokens, 3)).checked_for(model)
    padded = GateData.from_tokens(tokens, mask & torch.tensor([True, True, False]),
                                  lengths=torch.tensor([3, 2]), targets=torch.zeros_like(tokens))
    with pytest.raises(InputError, match="attends in both directions"):
        padded.checked_for(model)
