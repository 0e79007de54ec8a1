"""A planted model of Yang et al.'s (2025) three-stage symbolic circuit on ABA/ABB, with a word tokenizer.

Prompts are lines of three words and a query line of two, one token per word and per newline:
``BOS dog cat dog NL sun map sun NL red box`` -> `` red``. Three hand-set heads solve it, each needing
the one before:

- 0.0, symbol abstraction: at each word it attends two positions back only when that word is the same
  (otherwise to BOS, which carries nothing) and writes a flag: "this word is the line's A". The flag
  depends on the relation between words, never on which words they are.
- 1.0, symbolic induction: from every position it attends evenly to the third words of the example
  lines and writes their mean flag as the rule (1 for ABA, 0 for ABB).
- 2.0, retrieval: at the last position it attends to the query's first word when the rule is set and to
  its own (second) word otherwise, and copies that word into the answer.

Two heads only move literal tokens: 0.1 writes the previous token into scratch (nothing reads it) and
2.1 copies the current token into the answer with a weaker ``copy`` strength (on ABA it pushes the
wrong word: interfering). The other heads are empty. Attention by word slot (first, second, third) reads
absolute positions, which the fixed layout allows; the model is for token-level tests, not free text.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.testbeds import surgery
from chg_tlens.testbeds.planted import GroundTruthCircuit, PlantedHead, _Subspaces, build_planted_model

SPECIALS = ("<bos>", "<pad>", "<unk>", "\n")
"""Token ids 0-3: BOS (also the attention sink), padding, unknown, the line break."""
WORDS = ("dog", "cat", "sun", "map", "red", "box", "tree", "car", "cup", "hat", "pen", "bed")
"""The vocabulary's words (ids 4 onwards), all in the ``aba_abb`` task's built-in list, so that task
and its paired contexts build prompts for this model unchanged."""
LINE = 4
"""Tokens per example line: three words and a newline."""


def symbolic_circuit(n_ctx: int = 24, strength: float = 5.0, copy: float = 1.5) -> GroundTruthCircuit:
    """The planted symbolic circuit (three layers, four heads each) and ABA data with an ABB twin.

    ``strength`` is the retrieval head's answer logit, ``copy`` the literal copier's (keep it below
    ``strength`` so the model is right on both rules). ``.data(n, seed)`` gives ABA prompts with two
    example lines; roles on that data are known: 0.0, 1.0, 2.0 facilitating, 2.1 interfering, the
    rest irrelevant. ``extra`` names the three symbolic heads and holds the word list.
    """
    if not 0 < copy < strength:
        raise InputError(f"symbolic_circuit: needs 0 < copy < strength, got copy={copy}, strength={strength}")
    if n_ctx < 1 + LINE + 3:
        raise InputError(f"symbolic_circuit: n_ctx must fit BOS, one example line and a query, got {n_ctx}.")
    vocab = len(SPECIALS) + len(WORDS)
    spaces = _Subspaces(vocab, n_ctx, n_extra=2)
    flag, rule = spaces.extra.start, spaces.extra.start + 1
    d_head = n_ctx + vocab + 2
    literal = [PlantedHead(0, 1, ("offset", 1), 0, 3.0), PlantedHead(2, 1, ("offset", 0), +1, copy)]
    model = build_planted_model(3, 4, literal, vocab=vocab, n_ctx=n_ctx, name="planted-symbolic",
                                n_extra=2, d_head=d_head)
    sharp = 20.0 * math.sqrt(d_head)  # attention logits are divided by sqrt(d_head)
    surgery.write_head_weights(model, 0, 0, *_abstraction_head(spaces, d_head, sharp, flag))
    surgery.write_head_weights(model, 1, 0, *_induction_head(spaces, d_head, sharp, flag, rule))
    surgery.write_head_weights(model, 2, 0, *_retrieval_head(spaces, d_head, sharp, rule, strength))
    model.tokenizer = word_tokenizer()
    max_shots = (n_ctx - 4) // LINE

    def make(n: int, seed: int, n_shots: int = 2) -> GateData:
        if not 1 <= n_shots <= max_shots:
            raise InputError(f"n_shots must be in 1..{max_shots} for n_ctx={n_ctx}, got {n_shots}.")
        rng = np.random.default_rng(seed)
        clean, twin = [], []
        for _ in range(n):
            drawn = (len(SPECIALS) + rng.permutation(len(WORDS))[: 2 * (n_shots + 1)]).tolist()
            for side, third in ((clean, 0), (twin, 1)):  # ABA, then the ABB twin on the same words
                a, b = drawn[0:-2:2], drawn[1:-2:2]
                lines = [t for i in range(n_shots) for t in (a[i], b[i], (a, b)[third][i], 3)]
                side.append([0, *lines, drawn[-2], drawn[-1], drawn[-2 + third]])
        mask = torch.zeros(n, len(clean[0]), dtype=torch.bool)
        mask[:, -1] = True
        data = GateData.from_tokens(torch.tensor(clean), mask, meta={"task": "planted-symbolic"})
        return data.with_corrupt(GateData.from_tokens(torch.tensor(twin), mask.clone(),
                                                      meta={"task": "planted-symbolic", "twin": "abb"}))

    roles = np.full((3, 4), "irrelevant", dtype=object)
    roles[0, 0] = roles[1, 0] = roles[2, 0] = "facilitating"
    roles[2, 1] = "interfering"
    heads = {"symbol_abstraction": (0, 0), "symbolic_induction": (1, 0), "retrieval": (2, 0)}
    return GroundTruthCircuit("symbolic", model, literal, make,
                              "ABA/ABB: 0.0 symbol abstraction -> 1.0 symbolic induction -> 2.0 retrieval",
                              extra={"heads": heads, "literal_heads": [(0, 1), (2, 1)], "words": list(WORDS)},
                              roles=roles)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``SPECIALS + WORDS``: spaces separate words, a newline is its own token."""
    vocab = {word: i for i, word in enumerate((*SPECIALS, *WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _blank(spaces: _Subspaces, d_head: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w_q, w_k, w_v = (torch.zeros(spaces.d_model, d_head) for _ in range(3))
    return w_q, w_k, w_v, torch.zeros(d_head, spaces.d_model)


def _word_ids(spaces: _Subspaces) -> range:
    return range(spaces.token.start + len(SPECIALS), spaces.token.stop)


def _abstraction_head(spaces: _Subspaces, d_head: int, sharp: float, flag: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """0.0: two back scores ``sharp``, the same word scores ``sharp``, BOS ``1.5 sharp``: only a word
    equal to the one two back beats the sink. Values: 1 for a word, written as the flag."""
    w_q, w_k, w_v, w_o = _blank(spaces, d_head)
    n_ctx, match, sink = spaces.n_ctx, spaces.n_ctx, spaces.n_ctx + spaces.vocab
    for position in range(2, n_ctx):
        w_q[spaces.position.start + position, position - 2] = sharp
    w_k[spaces.position, :n_ctx] = torch.eye(n_ctx)
    for word in _word_ids(spaces):
        w_q[word, match + word] = sharp
        w_k[word, match + word] = 1.0
        w_v[word, 0] = 1.0
    w_q[spaces.constant, sink] = 1.5 * sharp
    w_k[spaces.token.start, sink] = 1.0
    w_o[0, flag] = 1.0
    return w_q, w_k, w_v, w_o


def _induction_head(spaces: _Subspaces, d_head: int, sharp: float, flag: int, rule: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """1.0: attends evenly to the third-word slots seen so far, writes their mean flag as the rule."""
    w_q, w_k, w_v, w_o = _blank(spaces, d_head)
    w_q[spaces.constant, 0] = sharp
    for position in range(3, spaces.n_ctx, LINE):
        w_k[spaces.position.start + position, 0] = 1.0
    w_v[flag, 0] = 1.0
    w_o[0, rule] = 1.0
    return w_q, w_k, w_v, w_o


def _retrieval_head(spaces: _Subspaces, d_head: int, sharp: float, rule: int, strength: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """2.0: its own and the previous position score ``3 sharp``; first-word slots add ``2 sharp * rule``,
    second-word slots ``sharp``. At the last position (a query's second word) that picks the query's
    first word when the rule is set, its own word otherwise; the word is copied into the answer."""
    w_q, w_k, w_v, w_o = _blank(spaces, d_head)
    n_ctx, first, second = spaces.n_ctx, spaces.n_ctx, spaces.n_ctx + 1
    for position in range(n_ctx):
        w_q[spaces.position.start + position, position] = 3.0 * sharp
        if position > 0:
            w_q[spaces.position.start + position, position - 1] = 3.0 * sharp
    w_k[spaces.position, :n_ctx] = torch.eye(n_ctx)
    w_q[rule, first] = 2.0 * sharp
    w_q[spaces.constant, second] = sharp
    for position in range(1, n_ctx, LINE):
        w_k[spaces.position.start + position, first] = 1.0
    for position in range(2, n_ctx, LINE):
        w_k[spaces.position.start + position, second] = 1.0
    for word in _word_ids(spaces):
        w_v[word, word] = 1.0
        w_o[word, spaces.answer.start + word] = strength
    return w_q, w_k, w_v, w_o
