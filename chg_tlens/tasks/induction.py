"""Induction: [BOS] + r + r for a random token sequence r; the loss counts the repeat.

Needs no tokenizer (token ids are drawn directly), so it runs on any model, planted or tiny. The first
token of the repeat is not a target: nothing before it says which token starts the repeat, so only
tokens ``2 .. len(r)`` of the second copy can be predicted by looking back (``len(r) - 1`` targets).
"""

from __future__ import annotations

import torch

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.tasks.examples import require_count


def induction(
    model: TransformerLensModel,
    n: int = 64,
    seed: int = 0,
    *,
    seq_len: int = 16,
    bos_token_id: int | None = None,
) -> GateData:
    """Repeated random sequences of ``seq_len`` tokens; the twin's second half is new random tokens.

    Tokens are drawn uniformly from the vocabulary without the tokenizer's special tokens (without the
    BOS id when there is no tokenizer). ``bos_token_id`` defaults to the tokenizer's BOS (or EOS), or
    0 for a model without a tokenizer.
    """
    task = "induction"
    layout = adapter.require_model(model)
    require_count(task, "n", n)
    require_count(task, "seed", seed, 0)
    require_count(task, "seq_len", seq_len, 2)
    if 1 + 2 * seq_len > layout.n_ctx:
        raise InputError(
            f"{task}: seq_len={seq_len} makes sequences of 1 + 2 * {seq_len} = {1 + 2 * seq_len} tokens, "
            f"longer than the model's context n_ctx={layout.n_ctx}; use seq_len <= {(layout.n_ctx - 1) // 2}."
        )
    bos = _bos_id(model) if bos_token_id is None else bos_token_id
    require_count(task, "bos_token_id", bos, 0)
    if bos >= layout.d_vocab:
        raise InputError(f"{task}: bos_token_id must be < d_vocab={layout.d_vocab}, got {bos}.")
    allowed = _ordinary_ids(model, layout.d_vocab, bos)
    if len(allowed) < 2:
        raise InputError(f"{task}: the vocabulary has fewer than 2 ordinary tokens to draw from.")

    generator = torch.Generator().manual_seed(seed)
    first = allowed[torch.randint(len(allowed), (n, seq_len), generator=generator)]
    fresh = allowed[torch.randint(len(allowed), (n, seq_len), generator=generator)]
    bos_column = torch.full((n, 1), bos, dtype=torch.long)
    tokens = torch.cat([bos_column, first, first], dim=1)
    corrupt_tokens = torch.cat([bos_column, first, fresh], dim=1)
    target_mask = torch.zeros_like(tokens, dtype=torch.bool)
    target_mask[:, 2 + seq_len:] = True

    meta = {"task": task, "seed": seed, "options": {"seq_len": seq_len, "bos_token_id": bos}}
    pad = adapter.pad_token_id(model)
    clean = GateData.from_tokens(tokens, target_mask, pad_token_id=pad, meta=meta)
    corrupt = GateData.from_tokens(corrupt_tokens, target_mask.clone(), pad_token_id=pad,
                                   meta={"task": task, "twin": "corrupt", "corruption": "random_second_half"})
    return clean.with_corrupt(corrupt).checked_for(model)


def _bos_id(model: TransformerLensModel) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    for attribute in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            return int(value)
    return 0


def _ordinary_ids(model: TransformerLensModel, d_vocab: int, bos: int) -> torch.Tensor:
    """Token ids to draw from: the vocabulary without special tokens (and never the BOS id)."""
    excluded = {bos}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        excluded |= {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    keep = torch.ones(d_vocab, dtype=torch.bool)
    keep[[i for i in excluded if 0 <= i < d_vocab]] = False
    return torch.nonzero(keep).flatten()
