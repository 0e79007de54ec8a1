"""A known-role model built to separate head-attribution methods: 4 layers x 8 heads, several mechanisms.

On one-mechanism toys nearly every method finds the planted heads. Here the answer to "which heads
matter?" is known and the mechanisms are the ones that trip methods on real models:

    backup      3.0 copies the answer only once the main mover 1.0 is gone (it reads a flag 1.0 writes),
                the IOI pattern: one-at-a-time scores (ablation, patching, gradients) see nothing
    AND         0.0 previous-token -> 2.0 induction, K-composition across two layers: 0.0 writes only
                to a scratch space the output never reads, and its output is the same in the corrupt twin
    interfering 0.3 copies a distractor token into the answer space, 2.1 writes the answer's opposite
    distractors 0.1 and 3.1 write large, answer-correlated outputs into a sink nothing reads; 0.2 adds
                the same large amount to every logit (the softmax never sees it)

The task: ``[BOS, T, A, D, r, r, T, A]``, predict the final ``A`` after the second trigger ``T`` (the
last token of the vocabulary, nowhere else); ``D`` is a distractor (never ``A``), ``r`` random tokens.
The movers read ``A`` at its position; the induction head finds it as "the token after the earlier T".
The corrupt twin replaces ``A`` (both times).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from chg_tlens.core.data import GateData
from chg_tlens.testbeds import surgery
from chg_tlens.testbeds.benchmark_models import (
    SHARPNESS,
    GroundTruthCircuit,
    _other_token,
    plant_induction_head,
)
from chg_tlens.testbeds.planted import PlantedHead, _head_weights, _Subspaces, build_planted_model

N_LAYERS, N_HEADS = 4, 8
MAIN, BACKUP, PREVIOUS, INDUCTION = (1, 0), (3, 0), (0, 0), (2, 0)
INTERFERING = ((0, 3), (2, 1))
DISTRACTORS = ((0, 1), (3, 1), (0, 2))
ANSWER_AT, DISTRACTOR_AT = 2, 3


def composite_circuit(vocab: int = 10, seq_len: int = 8, mover: float = 3.0, induction: float = 3.0,
                      distractor: float = 2.0, opposite: float = 1.0, loud: float = 20.0
                      ) -> GroundTruthCircuit:
    """The model above; ``loud`` is the output scale of the distractor heads (large on purpose)."""
    n_ctx = max(16, seq_len)
    spaces = _Subspaces(vocab, n_ctx, n_extra=1 + vocab)  # a flag, then a sink nothing reads
    standard = [
        PlantedHead(*PREVIOUS, ("offset", 1), 0, 3.0),  # token t-1 -> scratch (read by the induction head)
        PlantedHead(*INTERFERING[0], ("fixed", DISTRACTOR_AT), +1, distractor),  # D -> answer
        PlantedHead(*INTERFERING[1], ("fixed", ANSWER_AT), -1, opposite),  # A against the answer
    ]
    model = build_planted_model(N_LAYERS, N_HEADS, standard, vocab=vocab, n_ctx=n_ctx,
                                name="planted-composite", n_extra=1 + vocab)
    plant_induction_head(model, *INDUCTION, vocab=vocab, n_ctx=n_ctx, strength=induction)
    _write(model, MAIN, *_main_mover(spaces, model.cfg.d_head, mover))
    _write(model, BACKUP, *_backup_mover(spaces, model.cfg.d_head, mover))
    _write(model, DISTRACTORS[0], *_sink_writer(spaces, model.cfg.d_head, ("fixed", ANSWER_AT), loud))
    _write(model, DISTRACTORS[1], *_sink_writer(spaces, model.cfg.d_head, ("offset", 1), loud))
    _write(model, DISTRACTORS[2], *_every_logit(spaces, model.cfg.d_head, loud))

    def make(n: int, seed: int) -> GateData:
        rng = np.random.default_rng(seed)
        trigger = vocab - 1
        tokens = torch.as_tensor(rng.integers(1, trigger, size=(n, seq_len)))
        tokens[:, 0] = 0
        tokens[:, 1] = tokens[:, -2] = trigger
        answer = tokens[:, ANSWER_AT]
        tokens[:, DISTRACTOR_AT] = _other_token([answer, torch.full_like(answer, trigger)], vocab, seed + 1)
        tokens[:, -1] = answer
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, -1] = True
        corrupt = tokens.clone()
        corrupt[:, ANSWER_AT] = _other_token([answer, tokens[:, DISTRACTOR_AT],
                                              torch.full_like(answer, trigger)], vocab, seed)
        corrupt[:, -1] = corrupt[:, ANSWER_AT]
        clean = GateData.from_tokens(tokens, mask, meta={"task": "planted-composite"})
        return clean.with_corrupt(GateData.from_tokens(corrupt, mask.clone(),
                                                       meta={"task": "planted-composite", "twin": "corrupt"}))

    roles = np.full((N_LAYERS, N_HEADS), "irrelevant", dtype=object)
    for head in (MAIN, BACKUP, PREVIOUS, INDUCTION):
        roles[head] = "facilitating"
    for head in INTERFERING:
        roles[head] = "interfering"
    return GroundTruthCircuit(
        "composite", model, standard, make,
        "32 heads: main mover 1.0 + backup 3.0, previous-token 0.0 -> induction 2.0 (AND), "
        "interfering 0.3 and 2.1, loud distractors 0.1, 3.1 (sink) and 0.2 (every logit)",
        roles=roles,
        diagnostics={"backup": BACKUP, "main": MAIN, "and": [PREVIOUS, INDUCTION],
                     "distractors": list(DISTRACTORS)},
    )


def _flag(spaces: _Subspaces) -> int:
    return spaces.extra.start


def _sink(spaces: _Subspaces) -> slice:
    return slice(spaces.extra.start + 1, spaces.extra.start + 1 + spaces.vocab)


def _blank(spaces: _Subspaces, d_head: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (torch.zeros(spaces.d_model, d_head), torch.zeros(spaces.d_model, d_head),
            torch.zeros(spaces.d_model, d_head), torch.zeros(d_head, spaces.d_model))


def _main_mover(spaces: _Subspaces, d_head: int, strength: float) -> tuple[Tensor, ...]:
    """Attends to A's position, copies its token into the answer and raises the flag (from the constant)."""
    w_q, w_k, w_v, w_o = _head_weights(PlantedHead(0, 0, ("fixed", ANSWER_AT), +1, strength), spaces,
                                       d_head, SHARPNESS)
    w_v[spaces.constant, spaces.vocab] = 1.0  # a spare value dimension carries the constant ...
    w_o[spaces.vocab, _flag(spaces)] = 1.0  # ... into the flag
    return w_q, w_k, w_v, w_o


def _backup_mover(spaces: _Subspaces, d_head: int, strength: float) -> tuple[Tensor, ...]:
    """Attends to A's position (and copies its token into the answer) unless the flag is up: then to BOS,
    whose value is empty."""
    w_q, w_k, w_v, w_o = _blank(spaces, d_head)
    w_q[spaces.constant, 0] = SHARPNESS
    w_k[spaces.position.start + ANSWER_AT, 0] = 1.0
    w_q[_flag(spaces), 1] = 2 * SHARPNESS
    w_k[spaces.position.start, 1] = 1.0
    w_v[spaces.token, : spaces.vocab] = torch.eye(spaces.vocab)
    w_v[spaces.token.start, 0] = 0.0
    w_o[: spaces.vocab, spaces.answer] = strength * torch.eye(spaces.vocab)
    return w_q, w_k, w_v, w_o


def _sink_writer(spaces: _Subspaces, d_head: int, attend: tuple[str, int], strength: float
                 ) -> tuple[Tensor, ...]:
    """A planted copying head whose output goes to the sink: large, often the answer, never read."""
    w_q, w_k, w_v, w_o = _head_weights(PlantedHead(0, 0, attend, 0, strength), spaces, d_head, SHARPNESS)
    w_o[:, _sink(spaces)] = w_o[:, spaces.scratch]
    w_o[:, spaces.scratch] = 0.0
    return w_q, w_k, w_v, w_o


def _every_logit(spaces: _Subspaces, d_head: int, strength: float) -> tuple[Tensor, ...]:
    """Attends to position 0 and adds ``strength`` to every answer dimension alike: a large output the
    softmax cannot see."""
    w_q, w_k, w_v, w_o = _blank(spaces, d_head)
    w_q[spaces.constant, 0] = SHARPNESS
    w_k[spaces.position.start, 0] = 1.0
    w_v[spaces.constant, 0] = 1.0
    w_o[0, spaces.answer] = strength
    return w_q, w_k, w_v, w_o


def _write(model: nn.Module, head: tuple[int, int], *weights: Tensor) -> None:
    surgery.write_head_weights(model, head[0], head[1], *weights)


CANDIDATE_MOVER, CANDIDATE_SET = (1, 0), (0, 1)


def candidate_set_circuit(vocab: int = 10, seq_len: int = 6, mover: float = 2.0, candidates: float = 4.0,
                          n_candidates: int = 4) -> GroundTruthCircuit:
    """2 layers x 4 heads where target NLL and the clean-vs-corrupt contrast disagree about one head.

    The task is ``[BOS, T, A, r.., T, A]``: predict the final ``A``; the corrupt twin replaces ``A``.
    Answers (clean and corrupt) are drawn from the first ``n_candidates`` ordinary tokens. The mover 1.0
    copies ``A`` into the answer. The candidate-set head 0.1 raises those candidates alike: it lowers
    target NLL, so a fit on NLL keeps it, but the answer and the corrupt answer are both candidates, so
    it does nothing for telling them apart. ``roles``
    are the contrast's: mover facilitating, everything else irrelevant
    (``diagnostics["nll_roles"]`` are NLL's: the candidate-set head facilitating too).
    """
    n_ctx = max(16, seq_len)
    spaces = _Subspaces(vocab, n_ctx)
    model = build_planted_model(2, 4, [PlantedHead(*CANDIDATE_MOVER, ("fixed", ANSWER_AT), +1, mover)],
                                vocab=vocab, n_ctx=n_ctx, name="planted-candidate-set")
    w_q, w_k, w_v, w_o = _blank(spaces, model.cfg.d_head)
    w_q[spaces.constant, 0] = SHARPNESS
    w_k[spaces.position.start, 0] = 1.0  # attends to BOS, whose constant it carries
    w_v[spaces.constant, 0] = 1.0
    w_o[0, spaces.answer.start + 1 : spaces.answer.start + 1 + n_candidates] = candidates
    _write(model, CANDIDATE_SET, w_q, w_k, w_v, w_o)

    def make(n: int, seed: int) -> GateData:
        rng = np.random.default_rng(seed)
        trigger = vocab - 1
        tokens = torch.as_tensor(rng.integers(1, trigger, size=(n, seq_len)))
        tokens[:, 0] = 0
        tokens[:, 1] = tokens[:, -2] = trigger
        tokens[:, ANSWER_AT] = torch.as_tensor(rng.integers(1, 1 + n_candidates, size=n))
        tokens[:, -1] = tokens[:, ANSWER_AT]
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, -1] = True
        corrupt = tokens.clone()
        corrupt[:, ANSWER_AT] = _other_token([tokens[:, ANSWER_AT]], 1 + n_candidates, seed)
        corrupt[:, -1] = corrupt[:, ANSWER_AT]
        meta = {"task": "planted-candidate-set"}
        return GateData.from_tokens(tokens, mask, meta=meta).with_corrupt(
            GateData.from_tokens(corrupt, mask.clone(), meta=meta | {"twin": "corrupt"}))

    roles = np.full((2, 4), "irrelevant", dtype=object)
    roles[CANDIDATE_MOVER] = "facilitating"
    nll_roles = roles.copy()
    nll_roles[CANDIDATE_SET] = "facilitating"
    return GroundTruthCircuit(
        "candidate-set", model, [], make,
        "8 heads: mover 1.0 (tells A from the corrupt answer), candidate-set head 0.1 (raises every "
        "candidate answer: NLL needs it, the contrast does not)",
        roles=roles, diagnostics={"nll_roles": nll_roles, "candidate_set": CANDIDATE_SET,
                                  "mover": CANDIDATE_MOVER},
    )
