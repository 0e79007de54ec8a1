"""Planted-circuit models: tiny TransformerBridges with hand-set weights whose head roles are known.

The residual stream is split into named subspaces:

    [ token one-hot | position one-hot | constant 1 | answer | scratch ]

The unembedding reads only ``answer``. A head attends by position (a fixed position, or a fixed offset
back) and copies the attended token into ``answer`` with a positive sign (facilitating), a negative sign
(interfering), or into ``scratch`` (irrelevant: nothing downstream ever reads it). Without layer norms
the heads' contributions add linearly, so the right answer to "what does each head do" is known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

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


@dataclass
class GroundTruthCircuit(PlantedCircuit):
    """A :class:`PlantedCircuit` whose roles are given per head instead of read off the heads' signs.

    Needed where a head's role comes from composition (a previous-token head writes to scratch, yet
    the task needs it) or from measurement (a trained model).
    """

    roles: np.ndarray | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def true_roles(self) -> np.ndarray:
        if self.roles is None:
            return super().true_roles()
        return self.roles.copy()


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
    n_extra: int = 0,
    d_head: int | None = None,
) -> nn.Module:
    """An attention-only model without norms whose planted heads do what ``heads`` says.

    ``n_extra`` adds residual dimensions after scratch for hand-written heads to talk through;
    ``d_head`` (default ``max(vocab, n_ctx)``) can be raised for heads that need more room.
    """
    spaces = _Subspaces(vocab, n_ctx, n_extra)
    d_head = max(vocab, n_ctx) if d_head is None else d_head
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


def function_vector_circuit(n_inputs: int = 6, n_shots: int = 4, strength: float = 8.0, copy: float = 1.5,
                            shift: int = 1) -> GroundTruthCircuit:
    """In-context learning with a head that carries the task as a function vector (Todd et al., 2024).

    Tokens: BOS 0, inputs ``1..m``, labels ``m+1..2m``; the function maps input ``x`` to label
    ``f(x) = m + 1 + (x - 1 + shift) mod m``. A prompt is ``BOS x1 f(x1) ... xk f(xk) q`` and the target
    is ``f(q)``. Three heads compute it, each needing the one before (an AND chain):

    - 0.0 checks each demonstration: from a label position it attends to the previous position only
      when that input maps to this label (otherwise to BOS, which carries nothing) and writes a
      *consistent* flag;
    - 1.0, the function-vector head: from every position it attends to the label positions and writes
      their mean flag as a *task* signal, the same vector for every clean prompt;
    - 2.0 applies the function: it attends to its own position (the query) and writes ``f(q)`` into the
      answer, but only when the task signal is present, otherwise a BOS sink wins its attention.

    1.1 copies the current token into the answer (at the query: never the answer, so interfering); 0.1
    writes scratch and 2.1 is empty (irrelevant). The corrupt twin keeps the demonstrations and the
    query but deranges the labels: every flag is off, the task signal is gone, and patching 1.0's mean
    clean output at the last position restores the answer, which no other head can do.
    """
    m, k = n_inputs, n_shots
    if k < 2 or m < k + 1:
        raise InputError(
            f"function_vector_circuit: needs n_shots >= 2 and n_inputs >= n_shots + 1 (distinct inputs "
            f"and a new query), got n_inputs={m}, n_shots={k}."
        )
    vocab, n_ctx = 1 + 2 * m, max(16, 2 * k + 3)
    labels = {x: m + 1 + (x - 1 + shift) % m for x in range(1, m + 1)}
    heads = [PlantedHead(0, 1, ("offset", 0), 0, 3.0), PlantedHead(1, 1, ("offset", 0), +1, copy)]
    spaces = _Subspaces(vocab, n_ctx, n_extra=2)
    d_head = n_ctx + vocab + 2
    model = build_planted_model(3, 2, heads, vocab=vocab, n_ctx=n_ctx, name="planted-function-vector",
                                n_extra=2, d_head=d_head)
    flag, task = spaces.extra.start, spaces.extra.start + 1
    sharp = 20.0 * math.sqrt(d_head)  # attention logits are divided by sqrt(d_head)
    surgery.write_head_weights(model, 0, 0, *_consistency_head(spaces, d_head, labels, sharp, flag))
    surgery.write_head_weights(model, 1, 0, *_task_head(spaces, d_head, labels, sharp, flag, task))
    surgery.write_head_weights(model, 2, 0, *_apply_head(spaces, d_head, labels, sharp, task, strength))

    def make(n: int, seed: int) -> GateData:
        rng = np.random.default_rng(seed)
        clean, shuffled = [], []
        for _ in range(n):
            xs = rng.permutation(np.arange(1, m + 1))[: k + 1]
            shots, query = [int(x) for x in xs[:k]], int(xs[k])
            order = rng.permutation(k)
            while (order == np.arange(k)).any():  # a derangement: no demonstration keeps its label
                order = rng.permutation(k)
            for side, ys in ((clean, shots), (shuffled, [shots[j] for j in order])):
                side.append([0, *[t for x, y in zip(shots, ys, strict=True) for t in (x, labels[y])],
                             query, labels[query]])
        mask = torch.zeros(n, 2 * k + 3, dtype=torch.bool)
        mask[:, -1] = True
        data = GateData.from_tokens(torch.tensor(clean), mask, meta={"task": "planted-function-vector"})
        twin = GateData.from_tokens(torch.tensor(shuffled), mask.clone(),
                                    meta={"task": "planted-function-vector", "twin": "shuffled_labels"})
        return data.with_corrupt(twin)

    roles = np.full((3, 2), "irrelevant", dtype=object)
    roles[0, 0] = roles[1, 0] = roles[2, 0] = "facilitating"
    roles[1, 1] = "interfering"
    return GroundTruthCircuit("function-vector", model, heads, make,
                              "in-context function; 0.0 checks demonstrations -> 1.0 task vector -> 2.0 "
                              "applies it", extra={"function_vector_head": (1, 0)}, roles=roles)


def _consistency_head(spaces: _Subspaces, d_head: int, labels: dict[int, int], sharp: float, flag: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """0.0 of :func:`function_vector_circuit`: the previous position scores ``sharp`` for being previous
    and ``sharp`` for holding the input this label belongs to; BOS scores ``1.5 sharp``, so only a
    consistent pair beats the sink. Values: 1 for an input token, so the head writes the flag."""
    w_q, w_k, w_v = (torch.zeros(spaces.d_model, d_head) for _ in range(3))
    w_o = torch.zeros(d_head, spaces.d_model)
    n_ctx, match, sink = spaces.n_ctx, spaces.n_ctx, spaces.n_ctx + spaces.vocab
    for position in range(1, n_ctx):
        w_q[spaces.position.start + position, position - 1] = sharp
    w_k[spaces.position, :n_ctx] = torch.eye(n_ctx)
    for x, y in labels.items():
        w_q[spaces.token.start + y, match + x] = sharp
        w_k[spaces.token.start + x, match + x] = 1.0
        w_v[spaces.token.start + x, 0] = 1.0
    w_q[spaces.constant, sink] = 1.5 * sharp
    w_k[spaces.token.start, sink] = 1.0
    w_o[0, flag] = 1.0
    return w_q, w_k, w_v, w_o


def _task_head(spaces: _Subspaces, d_head: int, labels: dict[int, int], sharp: float, flag: int, task: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """1.0 of :func:`function_vector_circuit`: attends evenly to label positions, writes their mean
    consistency flag as the task signal."""
    w_q, w_k, w_v = (torch.zeros(spaces.d_model, d_head) for _ in range(3))
    w_o = torch.zeros(d_head, spaces.d_model)
    w_q[spaces.constant, 0] = sharp
    for y in labels.values():
        w_k[spaces.token.start + y, 0] = 1.0
    w_v[flag, 0] = 1.0
    w_o[0, task] = 1.0
    return w_q, w_k, w_v, w_o


def _apply_head(spaces: _Subspaces, d_head: int, labels: dict[int, int], sharp: float, task: int,
                strength: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """2.0 of :func:`function_vector_circuit`: its own position scores ``sharp``; BOS scores
    ``1.5 sharp - sharp * task``, so with the task signal (about 1) it reads the query and writes
    ``f(query)``, without it the BOS sink (no value) takes the attention."""
    w_q, w_k, w_v = (torch.zeros(spaces.d_model, d_head) for _ in range(3))
    w_o = torch.zeros(d_head, spaces.d_model)
    n_ctx = spaces.n_ctx
    w_q[spaces.position, :n_ctx] = sharp * torch.eye(n_ctx)
    w_k[spaces.position, :n_ctx] = torch.eye(n_ctx)
    w_q[spaces.constant, n_ctx] = 1.5 * sharp
    w_q[task, n_ctx + 1] = sharp
    w_k[spaces.token.start, n_ctx] = 1.0
    w_k[spaces.token.start, n_ctx + 1] = -1.0
    for x, y in labels.items():
        w_v[spaces.token.start + x, x] = 1.0
        w_o[x, spaces.answer.start + y] = strength
    return w_q, w_k, w_v, w_o


class _Subspaces:
    """Index ranges of the residual stream's named parts (``extra``: dimensions for hand-written heads)."""

    def __init__(self, vocab: int, n_ctx: int, n_extra: int = 0) -> None:
        self.token = slice(0, vocab)
        self.position = slice(vocab, vocab + n_ctx)
        self.constant = vocab + n_ctx
        self.answer = slice(self.constant + 1, self.constant + 1 + vocab)
        self.scratch = slice(self.answer.stop, self.answer.stop + vocab)
        self.extra = slice(self.scratch.stop, self.scratch.stop + n_extra)
        self.d_model = self.extra.stop
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
