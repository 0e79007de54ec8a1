"""A planted model whose head-to-head wiring is known: which head reads which, and through which input.

Circuit discovery (:func:`chg_tlens.circuit`) claims more than roles: an edge from one head to a later
one through the receiver's query, key or value. This model has one edge of each kind, a head whose
output nothing reads, and nothing else, so the right edge set is exact:

    0.0 previous-token  -> 1.0 induction   through its KEY   (1.0 finds "the token after the earlier T")
    0.2 answer-flag     -> 1.1 finder      through its QUERY (1.1 looks for the token 0.2 names)
    0.1 current-token   -> 2.0 mover       through its VALUE (2.0 reads what 0.1 wrote at position 2)
    0.3 unread          writes into a sink no head and no logit reads
    2.1 interfering     copies the answer against itself

1.0, 1.1, 2.0 and 2.1 write into the answer space (edges to the logits); 0.0-0.3 write into spaces of
their own, each read by at most the one head above (0.3's by none), and no head reads the answer space.
The other heads are empty. No norms: a head's contribution is exactly additive.

The task: ``[BOS, T, A, r, r, r, T, A]``, predict the final ``A``; all seven tokens of a row (``T``,
``A``, the three ``r`` and the twin's ``T'``, ``A'``) are distinct. The corrupt twin is
``[BOS, T', A', r, r, r, T', A']``: every planted edge carries part of the change.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.testbeds import surgery
from chg_tlens.testbeds.benchmark_models import SHARPNESS, plant_induction_head
from chg_tlens.testbeds.planted import (
    GroundTruthCircuit,
    PlantedHead,
    _head_weights,
    _Subspaces,
    build_planted_model,
)

Head = tuple[int, int]
PREVIOUS, SIDE, FLAG, UNREAD = (0, 0), (0, 1), (0, 2), (0, 3)
INDUCTION, FINDER, MOVER, AGAINST = (1, 0), (1, 1), (2, 0), (2, 1)
ANSWER_AT, SEQ_LEN = 2, 8
WIRED_EDGES: list[tuple[Head, Head | str, str]] = [
    (PREVIOUS, INDUCTION, "k"), (FLAG, FINDER, "q"), (SIDE, MOVER, "v"),
    (INDUCTION, "logits", "logits"), (FINDER, "logits", "logits"), (MOVER, "logits", "logits"),
    (AGAINST, "logits", "logits"),
]
"""Every edge the model has: (sender, receiver or "logits", the receiver's input)."""


def wired_circuit(vocab: int = 12, copy: float = 1.5, against: float = 1.0, loud: float = 5.0
                  ) -> GroundTruthCircuit:
    """The model above (3 layers x 4 heads); ``copy`` is the answer strength of 1.0, 1.1 and 2.0,
    ``against`` that of 2.1, ``loud`` the size of 0.3's unread output (large on purpose).
    ``diagnostics["edges"]`` lists the planted edges, ``diagnostics["unread"]`` the unread head."""
    if vocab < 8:
        raise InputError(f"wired_circuit: vocab must be at least 8 (seven distinct tokens a row), got "
                         f"{vocab}.")
    n_ctx = 16
    spaces = _Subspaces(vocab, n_ctx, n_extra=3 * vocab)  # side channel, flag, sink
    side, flag, sink = (slice(spaces.extra.start + i * vocab, spaces.extra.start + (i + 1) * vocab)
                        for i in range(3))
    standard = [PlantedHead(*PREVIOUS, ("offset", 1), 0, 3.0),  # token t-1 -> scratch, read by 1.0's key
                PlantedHead(*AGAINST, ("fixed", ANSWER_AT), -1, against)]
    model = build_planted_model(3, 4, standard, vocab=vocab, n_ctx=n_ctx, name="planted-wiring",
                                n_extra=3 * vocab)
    d_head = model.cfg.d_head
    plant_induction_head(model, *INDUCTION, vocab=vocab, n_ctx=n_ctx, strength=copy)
    _write(model, SIDE, *_copy_into(spaces, d_head, ("offset", 0), side, 1.0))
    _write(model, FLAG, *_copy_into(spaces, d_head, ("fixed", ANSWER_AT), flag, 1.0))
    _write(model, UNREAD, *_copy_into(spaces, d_head, ("fixed", ANSWER_AT), sink, loud))
    _write(model, FINDER, *_finder(spaces, d_head, flag, copy))
    _write(model, MOVER, *_side_mover(spaces, d_head, side, copy))

    def make(n: int, seed: int) -> GateData:
        rng = np.random.default_rng(seed)
        picks = np.stack([rng.permutation(np.arange(1, vocab))[:7] for _ in range(n)])
        trigger, answer, randoms, other_trigger, other_answer = (picks[:, 0], picks[:, 1], picks[:, 2:5],
                                                                 picks[:, 5], picks[:, 6])
        clean = np.concatenate([np.zeros((n, 1), dtype=np.int64), trigger[:, None], answer[:, None], randoms,
                                trigger[:, None], answer[:, None]], axis=1)
        corrupt = clean.copy()
        corrupt[:, [1, 6]] = other_trigger[:, None]
        corrupt[:, [ANSWER_AT, 7]] = other_answer[:, None]
        mask = torch.zeros(n, SEQ_LEN, dtype=torch.bool)
        mask[:, -1] = True
        twin = GateData.from_tokens(torch.as_tensor(corrupt), mask.clone(),
                                    meta={"task": "planted-wiring", "twin": "corrupt"})
        return GateData.from_tokens(torch.as_tensor(clean), mask,
                                    meta={"task": "planted-wiring"}).with_corrupt(twin)

    roles = np.full((3, 4), "irrelevant", dtype=object)
    for head in (PREVIOUS, SIDE, FLAG, INDUCTION, FINDER, MOVER):
        roles[head] = "facilitating"
    roles[AGAINST] = "interfering"
    return GroundTruthCircuit(
        "wiring", model, standard, make,
        "12 heads: 0.0 -> 1.0 (key), 0.2 -> 1.1 (query), 0.1 -> 2.0 (value); 0.3 unread; 2.1 against",
        roles=roles, diagnostics={"edges": list(WIRED_EDGES), "unread": UNREAD},
    )


def _copy_into(spaces: _Subspaces, d_head: int, attend: tuple[str, int], target: slice, strength: float
               ) -> tuple[Tensor, ...]:
    """A planted copying head (``attend``) whose output goes to ``target`` instead of scratch."""
    w_q, w_k, w_v, w_o = _head_weights(PlantedHead(0, 0, attend, 0, strength), spaces, d_head, SHARPNESS)
    w_o[:, target] = w_o[:, spaces.scratch]
    w_o[:, spaces.scratch] = 0.0
    return w_q, w_k, w_v, w_o


def _finder(spaces: _Subspaces, d_head: int, flag: slice, strength: float) -> tuple[Tensor, ...]:
    """1.1: its query is the token 0.2 wrote into ``flag``, its keys the tokens: it attends to where that
    token occurs and copies it into the answer. Without the flag it reads nothing in particular."""
    vocab = spaces.vocab
    w_q, w_k, w_v = (torch.zeros(spaces.d_model, d_head) for _ in range(3))
    w_o = torch.zeros(d_head, spaces.d_model)
    w_q[flag, :vocab] = SHARPNESS * torch.eye(vocab)
    w_k[spaces.token, :vocab] = torch.eye(vocab)
    w_v[spaces.token, :vocab] = torch.eye(vocab)
    w_v[spaces.token.start, 0] = 0.0  # BOS carries no content
    w_o[:vocab, spaces.answer] = strength * torch.eye(vocab)
    return w_q, w_k, w_v, w_o


def _side_mover(spaces: _Subspaces, d_head: int, side: slice, strength: float) -> tuple[Tensor, ...]:
    """2.0: attends to the answer's position and copies what 0.1 wrote there (``side``), not the token."""
    vocab = spaces.vocab
    w_q, w_k, _, w_o = _head_weights(PlantedHead(0, 0, ("fixed", ANSWER_AT), +1, strength), spaces, d_head,
                                     SHARPNESS)
    w_v = torch.zeros(spaces.d_model, d_head)
    w_v[side, :vocab] = torch.eye(vocab)
    return w_q, w_k, w_v, w_o


def _write(model: torch.nn.Module, head: Head, *weights: Tensor) -> None:
    surgery.write_head_weights(model, head[0], head[1], *weights)
