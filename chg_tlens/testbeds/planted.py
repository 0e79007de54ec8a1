"""Planted-circuit models: tiny TransformerBridges with hand-set weights whose head roles are known.

The residual stream is split into named subspaces:

    [ token one-hot | position one-hot | constant 1 | answer | scratch ]

The unembedding reads only ``answer``. A head attends by position (a fixed position, or a fixed offset
back) and copies the attended token into ``answer`` with a positive sign (facilitating), a negative sign
(interfering), or into ``scratch`` (irrelevant: nothing downstream ever reads it). Without layer norms
the heads' contributions add linearly, so the right answer to "what does each head do" is known exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.testbeds import surgery

Write = Literal["answer", "scratch"]
ROLE_OF_SIGN = {1: "facilitating", -1: "interfering", 0: "irrelevant"}


@dataclass(frozen=True)
class PlantedHead:
    """One head's planted behaviour.

    ``attend=("fixed", p)`` looks at position p from every query; ``("offset", k)`` looks k positions
    back. ``sign`` +1 / -1 writes the attended token for / against the answer; 0 writes to scratch.
    """

    layer: int
    head: int
    attend: tuple[str, int]
    sign: int
    strength: float = 3.0

    @property
    def role(self) -> str:
        return ROLE_OF_SIGN[self.sign]


@dataclass
class PlantedCircuit:
    """A planted model, a way to make its task data, and the roles that are true by construction."""

    name: str
    model: nn.Module
    heads: list[PlantedHead]
    make_data: Callable[[int, int], GateData]
    description: str = ""
    extra: dict = field(default_factory=dict)

    def data(self, n_examples: int = 64, seed: int = 0) -> GateData:
        return self.make_data(n_examples, seed)

    def true_roles(self) -> np.ndarray:
        """``[layer, head]`` array of role names; heads not planted are irrelevant (all-zero)."""
        return planted_roles(self.model.cfg.n_layers, self.model.cfg.n_heads, self.heads)

    def heads_with_role(self, role: str) -> list[tuple[int, int]]:
        roles = self.true_roles()
        return [(int(a), int(b)) for a, b in zip(*np.nonzero(roles == role), strict=True)]


def planted_roles(n_layers: int, n_heads: int, heads: list[PlantedHead]) -> np.ndarray:
    """``[layer, head]`` array of the planted heads' role names, "irrelevant" everywhere else."""
    roles = np.full((n_layers, n_heads), "irrelevant", dtype=object)
    for head in heads:
        roles[head.layer, head.head] = head.role
    return roles


def build_planted_model(
    n_layers: int,
    n_heads: int,
    heads: list[PlantedHead],
    vocab: int = 10,
    n_ctx: int = 16,
    sharpness: float = 60.0,
    name: str = "planted",
) -> nn.Module:
    """An attention-only model without norms whose planted heads do what ``heads`` says."""
    spaces = _Subspaces(vocab, n_ctx)
    d_head = max(vocab, n_ctx)
    model = adapter.build_native_model(
        model_name=name, d_model=spaces.d_model, d_head=d_head, n_layers=n_layers, n_ctx=n_ctx,
        n_heads=n_heads, d_vocab=vocab, attn_only=True, normalization_type=None,
        positional_embedding_type="standard",
    )
    surgery.zero_weights(model)
    embed = torch.zeros(vocab, spaces.d_model)
    embed[:, spaces.token] = torch.eye(vocab)
    pos_embed = torch.zeros(n_ctx, spaces.d_model)
    pos_embed[:, spaces.position] = torch.eye(n_ctx)
    pos_embed[:, spaces.constant] = 1.0
    unembed = torch.zeros(spaces.d_model, vocab)
    unembed[spaces.answer] = torch.eye(vocab)
    surgery.write_weights(model, embed, pos_embed, unembed)
    for planted in heads:
        surgery.write_head_weights(model, planted.layer, planted.head,
                                   *_head_weights(planted, spaces, d_head, sharpness))
    return model


def recall_circuit(vocab: int = 10, seq_len: int = 8, alpha: float = 3.0, beta: float = 1.5
                   ) -> PlantedCircuit:
    """Task: the last token repeats the token at position 1. One layer, four heads.

    0.0 copies it for the answer (facilitating), 0.1 against it (interfering), 0.2 and 0.3 write to
    scratch (irrelevant).
    """
    heads = [PlantedHead(0, 0, ("fixed", 1), +1, alpha), PlantedHead(0, 1, ("fixed", 1), -1, beta),
             PlantedHead(0, 2, ("fixed", 1), 0, alpha), PlantedHead(0, 3, ("offset", 0), 0, alpha)]
    model = build_planted_model(1, 4, heads, vocab=vocab, n_ctx=max(16, seq_len), name="planted-recall")

    def make(n: int, seed: int) -> GateData:
        tokens, mask = recall_tokens(n, seq_len, vocab, seed)
        return GateData.from_tokens(tokens, mask, meta={"task": "planted-recall"})

    return PlantedCircuit("recall", model, heads, make,
                          "last token = token at position 1; one layer, 4 heads")


def recall_tokens(n: int, seq_len: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    """The recall task's tokens (BOS 0, random non-BOS tokens, the last one repeating position 1) and
    its target mask (the last token only)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(n, seq_len))
    tokens[:, 0] = 0
    tokens[:, -1] = tokens[:, 1]
    mask = np.zeros_like(tokens, dtype=bool)
    mask[:, -1] = True
    return torch.as_tensor(tokens), torch.as_tensor(mask)


def repeat_circuit(vocab: int = 10, period: int = 4, alpha: float = 3.0, beta: float = 1.5
                   ) -> PlantedCircuit:
    """Task: a random block of ``period`` tokens is repeated; predict the repeat. Two layers.

    1.1 copies the token ``period - 1`` back for the answer (facilitating), 0.2 against it
    (interfering), 0.0 and 1.3 write to scratch (irrelevant); the rest are empty.
    """
    shift = period - 1
    heads = [
        PlantedHead(1, 1, ("offset", shift), +1, alpha),
        PlantedHead(0, 2, ("offset", shift), -1, beta),
        PlantedHead(0, 0, ("offset", shift), 0, alpha),
        PlantedHead(1, 3, ("offset", 1), 0, alpha),
    ]
    seq_len = 1 + 2 * period
    model = build_planted_model(2, 4, heads, vocab=vocab, n_ctx=max(16, seq_len), name="planted-repeat")

    def make(n: int, seed: int) -> GateData:
        rng = np.random.default_rng(seed)
        block = rng.integers(1, vocab, size=(n, period))
        tokens = np.concatenate([np.zeros((n, 1), dtype=block.dtype), block, block], axis=1)
        mask = np.zeros_like(tokens, dtype=bool)
        mask[:, 1 + period :] = True
        return GateData.from_tokens(torch.as_tensor(tokens), torch.as_tensor(mask),
                                    meta={"task": "planted-repeat"})

    return PlantedCircuit("repeat", model, heads, make,
                          f"second copy of a {period}-token block; two layers, 4 heads each")


def contrastive_circuit(vocab: int = 10, seq_len: int = 8, alpha: float = 3.0) -> PlantedCircuit:
    """Task posed two ways: the answer (the last token) sits at position 1 (retain) or 2 (forget).

    Head 0.0 reads position 1 and serves the retain mode, 0.1 reads position 2 and serves the forget
    mode; 0.2 and 0.3 write to scratch. The unused slot holds token 0 (no content), so each mode's head
    is useless to the other mode, and the model falls back on a default guess. Contrastive CHG
    retaining mode 1 should close 0.1 and keep 0.0.
    """
    heads = [
        PlantedHead(0, 0, ("fixed", 1), +1, alpha),
        PlantedHead(0, 1, ("fixed", 2), +1, alpha),
        PlantedHead(0, 2, ("fixed", 1), 0, alpha),
        PlantedHead(0, 3, ("offset", 0), 0, alpha),
    ]
    model = build_planted_model(1, 4, heads, vocab=vocab, n_ctx=max(16, seq_len), name="planted-two-modes")
    unembed = model.W_U.detach().clone()  # a default guess (token 1, logit +1) that wins once neither
    unembed[_Subspaces(vocab, max(16, seq_len)).constant, 1] = 1.0  # mode's head reads the answer
    surgery.write_weights(model, unembed=unembed)

    def make(n: int, seed: int) -> GateData:
        rng = np.random.default_rng(seed)
        answer = rng.integers(1, vocab, size=n)
        sides = []
        for slot in (1, 2):
            tokens = rng.integers(1, vocab, size=(n, seq_len))
            tokens[:, :3] = 0
            tokens[:, slot] = answer
            tokens[:, -1] = answer
            mask = np.zeros_like(tokens, dtype=bool)
            mask[:, -1] = True
            sides.append(GateData.from_tokens(torch.as_tensor(tokens), torch.as_tensor(mask),
                                              meta={"task": f"planted-answer-at-{slot}"}))
        return GateData.contrastive(retain=sides[0], forget=sides[1])

    return PlantedCircuit("two-modes", model, heads, make,
                          "answer at position 1 (retain, head 0.0) or 2 (forget, head 0.1)",
                          extra={"retain_head": (0, 0), "forget_head": (0, 1)})


class _Subspaces:
    """Index ranges of the residual stream's named parts."""

    def __init__(self, vocab: int, n_ctx: int) -> None:
        self.token = slice(0, vocab)
        self.position = slice(vocab, vocab + n_ctx)
        self.constant = vocab + n_ctx
        self.answer = slice(self.constant + 1, self.constant + 1 + vocab)
        self.scratch = slice(self.answer.stop, self.answer.stop + vocab)
        self.d_model = self.scratch.stop
        self.n_ctx = n_ctx
        self.vocab = vocab


def _head_weights(planted: PlantedHead, spaces: _Subspaces, d_head: int, sharpness: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """W_Q, W_K, W_V ``[d_model, d_head]`` and W_O ``[d_head, d_model]`` of one planted head."""
    w_q, w_k, w_v = (torch.zeros(spaces.d_model, d_head) for _ in range(3))
    w_o = torch.zeros(d_head, spaces.d_model)
    kind, where = planted.attend
    n_ctx = spaces.n_ctx
    if kind == "fixed":
        w_q[spaces.constant, 0] = sharpness
        w_k[spaces.position.start + where, 0] = 1.0
    elif kind == "offset":
        for query_pos in range(where, n_ctx):
            w_q[spaces.position.start + query_pos, query_pos - where] = sharpness
        w_k[spaces.position, :n_ctx] = torch.eye(n_ctx)
    else:
        raise InputError(f"PlantedHead.attend must be ('fixed', p) or ('offset', k), got {planted.attend}.")
    w_v[spaces.token, : spaces.vocab] = torch.eye(spaces.vocab)
    w_v[spaces.token.start, 0] = 0.0  # token 0 (BOS / empty slot) carries no content
    target = spaces.scratch if planted.sign == 0 else spaces.answer
    sign = 1.0 if planted.sign == 0 else float(planted.sign)
    w_o[: spaces.vocab, target] = sign * planted.strength * torch.eye(spaces.vocab)
    return w_q, w_k, w_v, w_o
