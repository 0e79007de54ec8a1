"""Models whose head roles are known, for scoring head-attribution methods against the truth.

Four planted circuits, hand-set weights built on ``chg_tlens.planted`` (each a different shape that
trips a different kind of method), and one model trained here whose roles an independent diagnostic
reads off its attention patterns:

    recall_benchmark        planted.recall_circuit with a corrupt twin: the easy case
    redundant_circuit       two heads that each solve the task alone (an OR)
    interfering_circuit     a strong head copying a distractor, next to a weak helper
    induction_circuit       previous-token head -> induction head by K-composition (an AND)
    trained_induction       a 2-layer attention-only model trained on repeated sequences

Every ``.data(n, seed)`` carries a corrupt twin (same shapes) for patching methods, and
``.true_roles()`` gives the ``[layer, head]`` role names. "facilitating" = the task needs the head,
alone or as part of a composition; "interfering" = the task is better without it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import target_nll
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.testbeds import surgery
from chg_tlens.testbeds.planted import (
    GroundTruthCircuit,
    PlantedHead,
    _Subspaces,
    build_planted_model,
    planted_roles,
    recall_circuit,
    recall_tokens,
)

SHARPNESS = 60.0
"""Query scale of hand-set attention, the same as ``build_planted_model``'s default."""


def all_benchmarks(include_trained: bool = True, train_seed: int = 0) -> list[GroundTruthCircuit]:
    """Every benchmark model, easy one first; ``include_trained=False`` skips the training run."""
    models = [recall_benchmark(), redundant_circuit(), interfering_circuit(), induction_circuit()]
    if include_trained:
        models.append(trained_induction(seed=train_seed))
    return models


# ------------------------------------------------------------------------------ planted
def recall_benchmark() -> GroundTruthCircuit:
    """``planted.recall_circuit`` (0.0 facilitating, 0.1 interfering) plus a corrupt twin that changes
    the token at position 1, the one every planted head reads."""
    base = recall_circuit()
    vocab = base.model.cfg.d_vocab

    def make(n: int, seed: int) -> GateData:
        clean = base.data(n, seed)
        corrupt = clean.tokens.clone()
        corrupt[:, 1] = _other_token([corrupt[:, 1]], vocab, seed)
        corrupt[:, -1] = corrupt[:, 1]
        return clean.with_corrupt(GateData.from_tokens(corrupt, clean.target_mask.clone()))

    return GroundTruthCircuit("recall", base.model, base.heads, make, base.description,
                              roles=base.true_roles())


def redundant_circuit(vocab: int = 10, seq_len: int = 8, strength: float = 6.0, beta: float = 1.5
                      ) -> GroundTruthCircuit:
    """Task: the last token repeats the token at position 1. Two heads each solve it alone.

    0.1 and 1.2 both copy the token at position 1 into the answer with ``strength``, so removing
    either one leaves the task solved and removing both kills it: one-at-a-time ablation sees little
    of either. 1.3 copies it against the answer (interfering); 0.0 and 1.0 write to scratch.
    """
    heads = [
        PlantedHead(0, 1, ("fixed", 1), +1, strength),
        PlantedHead(1, 2, ("fixed", 1), +1, strength),
        PlantedHead(1, 3, ("fixed", 1), -1, beta),
        PlantedHead(0, 0, ("fixed", 1), 0, strength),
        PlantedHead(1, 0, ("offset", 0), 0, strength),
    ]
    model = build_planted_model(2, 4, heads, vocab=vocab, n_ctx=max(16, seq_len), name="planted-redundant")

    def make(n: int, seed: int) -> GateData:
        tokens, mask = recall_tokens(n, seq_len, vocab, seed)
        corrupt = tokens.clone()
        corrupt[:, 1] = _other_token([tokens[:, 1]], vocab, seed)
        corrupt[:, -1] = corrupt[:, 1]
        return _with_twin(tokens, mask, corrupt, "planted-redundant")

    roles = planted_roles(2, 4, heads)
    return GroundTruthCircuit("redundant", model, heads, make,
                              "last token = token at position 1; heads 0.1 and 1.2 each suffice alone",
                              roles=roles)


def interfering_circuit(vocab: int = 10, seq_len: int = 8, strength: float = 4.0, weak: float = 1.0,
                        distractor: float = 2.5) -> GroundTruthCircuit:
    """Task: the last token repeats the token at position 1, against a strong distractor head.

    1.0 copies the answer (``strength``), 0.2 copies it weakly (``weak``): both facilitating. 0.1
    copies the token at position 2 (never the answer) into the answer space with ``distractor``:
    interfering, with a larger loss gradient than the weak helper at the full model, so a method that
    ranks by gradient magnitude (Michel et al.) puts it above a real helper.
    0.0 and 1.1 write to scratch; 1.2 is empty.
    """
    heads = [
        PlantedHead(1, 0, ("fixed", 1), +1, strength),
        PlantedHead(0, 2, ("fixed", 1), +1, weak),
        PlantedHead(0, 1, ("fixed", 2), +1, distractor),
        PlantedHead(0, 0, ("offset", 0), 0, strength),
        PlantedHead(1, 1, ("fixed", 2), 0, strength),
    ]
    model = build_planted_model(2, 3, heads, vocab=vocab, n_ctx=max(16, seq_len),
                                name="planted-interfering")

    def make(n: int, seed: int) -> GateData:
        tokens, mask = recall_tokens(n, seq_len, vocab, seed)
        tokens[:, 2] = _other_token([tokens[:, 1]], vocab, seed + 1)  # the distractor is never the answer
        corrupt = tokens.clone()
        corrupt[:, 1] = _other_token([tokens[:, 1], tokens[:, 2]], vocab, seed)
        corrupt[:, -1] = corrupt[:, 1]
        return _with_twin(tokens, mask, corrupt, "planted-interfering")

    roles = planted_roles(2, 3, heads)
    roles[0, 1] = "interfering"  # writes for a token that is never the answer
    return GroundTruthCircuit("interfering", model, heads, make,
                              "last token = token at position 1; 0.1 pushes a distractor, 0.2 helps weakly",
                              roles=roles)


def induction_circuit(vocab: int = 10, period: tuple[int, int] = (3, 6), prev_strength: float = 3.0,
                      copy_strength: float = 5.0, beta: float = 1.5) -> GroundTruthCircuit:
    """Task: a block of distinct tokens, of random length per example, is repeated; predict the repeat.

    0.0 is a previous-token head: it writes token ``t-1`` into scratch at position ``t``. 1.1 is an
    induction head: its query is the current token, its key reads scratch (K-composition with 0.0),
    so it attends to the position just after the current token's earlier occurrence and copies that
    token into the answer. Neither works alone (an AND). Because the block length varies, no fixed
    offset solves the task. 1.2 copies the current token into the answer (always wrong:
    interfering); 0.1, 1.3 write where nothing reads; the rest are empty.
    """
    low, high = period
    n_ctx = max(16, 1 + 2 * high)
    if not 2 <= low <= high or high >= vocab:
        raise InputError(
            f"induction_circuit: period must be (low, high) with 2 <= low <= high < vocab={vocab}, "
            f"got {period}."
        )
    heads = [
        PlantedHead(0, 0, ("offset", 1), 0, prev_strength),
        PlantedHead(0, 1, ("fixed", 0), 0, prev_strength),
        PlantedHead(1, 2, ("offset", 0), +1, beta),
        PlantedHead(1, 3, ("offset", 1), 0, prev_strength),
    ]
    model = build_planted_model(2, 4, heads, vocab=vocab, n_ctx=n_ctx, name="planted-induction")
    plant_induction_head(model, layer=1, head=1, vocab=vocab, n_ctx=n_ctx, strength=copy_strength)

    def make(n: int, seed: int) -> GateData:
        rng = np.random.default_rng(seed)
        clean_seqs, corrupt_seqs, masks = [], [], []
        for _ in range(n):
            size = int(rng.integers(low, high + 1))
            block = rng.permutation(np.arange(1, vocab))[:size]
            other = rng.permutation(np.arange(1, vocab))[:size]
            clean_seqs.append([0, *block, *block])
            corrupt_seqs.append([0, *other, *block])
            masks.append([False] * (size + 2) + [True] * (size - 1))
        clean = GateData.from_sequences(clean_seqs, masks, meta={"task": "planted-induction"})
        corrupt = GateData.from_sequences(corrupt_seqs, masks, meta={"task": "planted-induction",
                                                                      "twin": "corrupt"})
        return clean.with_corrupt(corrupt)

    roles = np.full((2, 4), "irrelevant", dtype=object)
    roles[0, 0] = roles[1, 1] = "facilitating"
    roles[1, 2] = "interfering"
    return GroundTruthCircuit("induction", model, heads, make,
                              "repeated block of random length; 0.0 previous-token -> 1.1 induction",
                              roles=roles)


def plant_induction_head(model: nn.Module, layer: int, head: int, vocab: int, n_ctx: int,
                         strength: float, sharpness: float = SHARPNESS) -> None:
    """Hand-set one head of a planted model as an induction head reading a previous-token head.

    Query = the current token's one-hot; key = the scratch space, where a previous-token head put
    token ``t-1``; so the head attends to every position whose previous token is the current token,
    and its value/output copy that position's token into the answer with ``strength``.
    """
    spaces = _Subspaces(vocab, n_ctx)
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    w_q, w_k, w_v = (torch.zeros(d_model, d_head) for _ in range(3))
    w_o = torch.zeros(d_head, d_model)
    w_q[spaces.token, :vocab] = sharpness * torch.eye(vocab)
    w_k[spaces.scratch, :vocab] = torch.eye(vocab)
    w_v[spaces.token, :vocab] = torch.eye(vocab)
    w_o[:vocab, spaces.answer] = strength * torch.eye(vocab)
    surgery.write_head_weights(model, layer, head, w_q, w_k, w_v, w_o)


# ------------------------------------------------------------------------------ trained
@dataclass
class InductionTraining:
    """How the trained benchmark is made: a tiny attention-only model on repeated random blocks.

    The defaults learn previous-token heads in layer 0 and induction heads in layer 1 in 500 Adam
    steps (about 5 s on one CPU core); without layer norm and at this learning rate they form fast.
    """

    vocab: int = 16
    period: tuple[int, int] = (3, 8)
    """Smallest and largest block length."""
    n_ctx: int = 24
    n_layers: int = 2
    n_heads: int = 4
    d_head: int = 16
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-2
    seed: int = 0
    role_threshold: float = 0.5
    """A head whose mean previous-token, duplicate-token or induction attention exceeds this is
    facilitating."""

    def validate(self) -> InductionTraining:
        low, high = self.period
        if not 2 <= low <= high or 1 + 2 * high > self.n_ctx:
            raise InputError(
                f"InductionTraining.period must be (low, high) with 2 <= low <= high and two blocks "
                f"fitting in n_ctx={self.n_ctx} after BOS, got {self.period}."
            )
        if self.vocab < 3:
            raise InputError(f"InductionTraining.vocab must be at least 3, got {self.vocab}.")
        return self


def trained_induction(seed: int = 0, config: InductionTraining | None = None) -> GroundTruthCircuit:
    """Train a 2-layer attention-only model on repeated random blocks, then label its heads.

    Ground truth is read off the attention patterns, not from any head-scoring method: a head is a
    previous-token head when it puts more than ``role_threshold`` of its attention on ``t-1``, a
    duplicate-token head when it puts that much on the current token's earlier occurrence, an induction
    head when it puts that much on the token after it; all are facilitating (induction needs them),
    the rest irrelevant. Seconds on a CPU. ``diagnostics`` keeps the three scores and the loss.
    """
    config = (config or InductionTraining(seed=seed)).validate()
    started = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = adapter.build_native_model(
            model_name="trained-induction", seed=config.seed, d_model=config.n_heads * config.d_head,
            d_head=config.d_head, n_layers=config.n_layers, n_ctx=config.n_ctx, n_heads=config.n_heads,
            d_vocab=config.vocab, attn_only=True, normalization_type=None,
            positional_embedding_type="standard", act_fn="relu", d_mlp=4,
        )
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    losses = []
    with _one_thread():
        for _ in range(config.steps):
            tokens, mask, _, _, _ = repeated_blocks(config.batch_size, config, generator, fill=True)
            loss = target_nll(model(tokens), tokens, mask)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    def make(n: int, data_seed: int) -> GateData:
        gen = torch.Generator().manual_seed(10_000 + data_seed)
        tokens, mask, _, _, corrupt = repeated_blocks(n, config, gen)
        return _with_twin(tokens, mask, corrupt, "trained-induction")

    probe = torch.Generator().manual_seed(99_999)
    tokens, _, sizes, starts, _ = repeated_blocks(256, config, probe)
    scores = attention_diagnostics(model, tokens, sizes, starts)
    flagged = torch.stack(list(scores.values())).max(dim=0).values > config.role_threshold
    roles = np.where(flagged.numpy(), "facilitating", "irrelevant").astype(object)
    diagnostics = {
        **{f"{kind}_score": value for kind, value in scores.items()},
        "final_loss": float(np.mean(losses[-20:])), "train_seconds": time.time() - started,
        "config": config,
    }
    return GroundTruthCircuit("trained_induction", model, [], make,
                              "2-layer attention-only model trained here; roles from attention patterns",
                              roles=roles, diagnostics=diagnostics)


def repeated_blocks(
    n: int, config: InductionTraining, generator: torch.Generator, fill: bool = False
) -> tuple[Int[Tensor, "n pos"], Tensor, Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, "n pos"]]:
    """BOS, random filler, a random block, the block again, random filler to ``n_ctx``.

    Block length and start vary per example, so neither a fixed offset nor a fixed position predicts
    the repeat: only induction does. Targets are the repeat's tokens after its first; the corrupt twin
    redraws the first block. ``fill`` (for training) repeats the block to the end instead, so more
    tokens carry the signal. Returns tokens, target mask, block sizes, block starts, corrupt tokens.
    """
    low, high = config.period
    sizes = torch.randint(low, high + 1, (n,), generator=generator)
    slack = config.n_ctx - 1 - 2 * sizes
    starts = 1 + (torch.rand(n, generator=generator) * (slack + 1).float()).long().clamp(max=slack)
    tokens = torch.randint(1, config.vocab, (n, config.n_ctx), generator=generator)
    corrupt_block = torch.randint(1, config.vocab, (n, high), generator=generator)
    tokens[:, 0] = 0
    corrupt = tokens.clone()
    mask = torch.zeros(n, config.n_ctx, dtype=torch.bool)
    for i, (size, start) in enumerate(zip(sizes.tolist(), starts.tolist(), strict=True)):
        stop = config.n_ctx if fill else start + 2 * size
        for position in range(start + size, stop):
            tokens[i, position] = tokens[i, position - size]
        corrupt[i] = tokens[i]
        corrupt[i, start : start + size] = corrupt_block[i, :size]
        mask[i, start + size + 1 : stop] = True
    return tokens, mask, sizes, starts, corrupt


def attention_diagnostics(
    model: TransformerLensModel, tokens: Int[Tensor, "n pos"], sizes: Int[Tensor, " n"], starts: Int[Tensor,
    " n"]
) -> dict[str, Float[Tensor, "layer head"]]:
    """Per head, mean attention on ``t-1`` (previous token), and in the repeat on the current token's
    earlier occurrence (duplicate token) and on the position after it (induction)."""
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    scores: dict[str, list[Tensor]] = {"previous_token": [], "duplicate_token": [], "induction": []}
    for name in names:
        pattern = cache[name].float()  # [batch, head, query, key]
        pos = torch.arange(1, tokens.shape[1])
        scores["previous_token"].append(pattern[:, :, pos, pos - 1].mean(dim=(0, 2)))
        duplicate, induction = [], []
        for i, (size, start) in enumerate(zip(sizes.tolist(), starts.tolist(), strict=True)):
            query = torch.arange(start + size, start + 2 * size)
            duplicate.append(pattern[i][:, query, query - size].mean(dim=1))
            induction.append(pattern[i][:, query, query - size + 1].mean(dim=1))
        scores["duplicate_token"].append(torch.stack(duplicate).mean(dim=0))
        scores["induction"].append(torch.stack(induction).mean(dim=0))
    return {kind: torch.stack(per_layer) for kind, per_layer in scores.items()}


# ------------------------------------------------------------------------------ pieces
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Train the tiny model on one thread, then restore the caller's setting: on a shared or busy
    machine, intra-op threads on 64-wide matrices cost more in contention than they save (4x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _other_token(avoid: list[Int[Tensor, " n"]], vocab: int, seed: int) -> Int[Tensor, " n"]:
    """A non-BOS token per entry that differs from that entry in every tensor of ``avoid``."""
    generator = torch.Generator().manual_seed(seed + 7)
    drawn = torch.randint(1, vocab, avoid[0].shape, generator=generator)
    clash = torch.stack([drawn == a for a in avoid]).any(dim=0)
    while clash.any():
        drawn[clash] = torch.randint(1, vocab, (int(clash.sum()),), generator=generator)
        clash = torch.stack([drawn == a for a in avoid]).any(dim=0)
    return drawn


def _with_twin(tokens: Tensor, mask: Tensor, corrupt: Tensor, task: str) -> GateData:
    clean = GateData.from_tokens(tokens, mask, meta={"task": task})
    return clean.with_corrupt(GateData.from_tokens(corrupt, mask.clone(), meta={"task": task,
                                                                                "twin": "corrupt"}))
