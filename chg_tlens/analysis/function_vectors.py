"""Function-vector heads (Todd et al., 2024): the heads whose mean output carries an in-context task.

Each head's mean ``hook_z`` at the last prompt position over clean few-shot prompts is patched, at the
last position, into prompts whose demonstration labels are shuffled (same queries and answers). The
average indirect effect (AIE) of a head is the mean rise in the probability of the answer's first
token; the heads with the largest AIE are the function-vector heads. The paper's CHG check then asks
whether those heads have higher CHG facilitation than the rest (:meth:`FunctionVectorHeads.mediation_test`).

Heads are patched several at a time: the shuffled batch is repeated once per head and replica ``r``
gets head ``r``'s mean, so one forward pass covers many heads; only the last positions are unembedded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from chg_tlens.analysis.mediation import mediation_test
from chg_tlens.analysis.patching import clean_and_corrupt
from chg_tlens.core import checks, interventions
from chg_tlens.core.checks import SeedReduce
from chg_tlens.core.data import GateData
from chg_tlens.core.forward import logits_at, on_device
from chg_tlens.core.objectives import target_labels, target_positions
from chg_tlens.core.result import CHGResult
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel

Head = tuple[int, int]


@dataclass(frozen=True)
class FunctionVectorHeads:
    """Average indirect effect per head ``[layer, head]``, the top-k heads, and what it cost."""

    aie: Float[Tensor, "layer head"]
    """Mean rise in P(answer's first token) on shuffled-label prompts when the head's mean clean output
    is patched in at the last position."""
    heads: list[Head]
    """The ``top_k`` heads by AIE, largest first: the function-vector heads."""
    clean_probability: float
    """Mean P(answer's first token) on the clean prompts."""
    corrupt_probability: float
    """The same on the shuffled-label prompts, nothing patched: the baseline of every effect."""
    n_examples: int
    forward_passes: int
    """Example forward passes: clean prompts once, shuffled prompts once plus once per head."""
    seconds: float

    @property
    def flags(self) -> Bool[Tensor, "layer head"]:
        """The function-vector heads as a ``[layer, head]`` mask."""
        flags = torch.zeros(self.aie.shape, dtype=torch.bool)
        for layer, head in self.heads:
            flags[layer, head] = True
        return flags

    def to_frame(self) -> pd.DataFrame:
        """One row per head: layer, head, aie, rank (1 = largest AIE) and whether it is flagged."""
        n_layers, n_heads = self.aie.shape
        order = torch.sort(-self.aie.flatten(), stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(1, len(order) + 1)
        return pd.DataFrame({
            "layer": torch.arange(n_layers).repeat_interleave(n_heads).numpy(),
            "head": torch.arange(n_heads).repeat(n_layers).numpy(),
            "aie": self.aie.flatten().numpy(), "rank": rank.numpy(), "flagged": self.flags.flatten().numpy(),
        })

    def mediation_test(self, result: CHGResult, seed_reduce: SeedReduce | int = "max") -> dict[str, Any]:
        """The paper's check on this task: CHG facilitation (max over seeds) of these heads vs the rest,
        Welch's t-test and the Spearman correlation with the AIE (the paper, Llama-3: t = 8.52)."""
        if not isinstance(result, CHGResult):
            raise InputError(f"result: expected a CHGResult, got {type(result).__name__}.")
        if (result.n_layers, result.n_heads) != tuple(self.aie.shape):
            raise InputError(
                f"result: gates are [layer, head] = {[result.n_layers, result.n_heads]}, but the "
                f"function-vector scores are {list(self.aie.shape)}; was it fitted on another model?"
            )
        test = mediation_test(result, self.flags, seed_reduce)
        by_score = mediation_test(result, self.aie, seed_reduce)
        return {**test, "spearman_rho": by_score["spearman_rho"], "spearman_p": by_score["spearman_p"]}


def function_vector_heads(
    model: TransformerLensModel,
    data: GateData,
    corrupt: GateData | None = None,
    top_k: int = 10,
    batch_size: int = 64,
    progress: bool = True,
) -> FunctionVectorHeads:
    """Todd et al.'s average indirect effect of every head on an in-context task, and the top ``top_k``.

    ``data`` holds clean few-shot prompts and their answers; ``corrupt`` (default ``data.corrupt``) the
    same prompts with shuffled demonstration labels and the same answers, as
    ``tasks.function(model, ..., corrupt="shuffled_labels")`` makes them. The effect is measured on
    the answer's first token at the last prompt position. ``top_k`` is capped at the number of heads.
    ``batch_size`` bounds the rows (examples x heads) of one forward pass.
    """
    started = time.perf_counter()
    layout = adapter.require_model(model)
    clean, shuffled = clean_and_corrupt(model, data, corrupt, "function_vector_heads")
    n_total = layout.n_layers * layout.n_heads
    top_k = min(checks.positive_int(top_k, "top_k"), n_total)
    checks.positive_int(batch_size, "batch_size")
    _require_same_answers(clean, shuffled)
    device = adapter.model_device(model)
    examples = min(len(clean), batch_size)
    heads_per_pass = max(1, batch_size // examples)
    all_heads = [divmod(i, layout.n_heads) for i in range(n_total)]
    chunks = [all_heads[i : i + heads_per_pass] for i in range(0, n_total, heads_per_pass)]
    rise = torch.zeros(n_total)
    corrupt_total = 0.0
    with adapter.frozen(model), torch.no_grad():
        mean_z, clean_total = _mean_last_z(model, layout, clean, examples, device)
        bar = tqdm(total=len(chunks) * -(-len(shuffled) // examples), desc="function-vector heads",
                   disable=not progress, leave=False)
        for batch, tokens, target_mask in on_device(shuffled, examples, device):
            last, answer = _first_scored(tokens, target_mask, batch.targets_to(device))
            base = _answer_probability(logits_at(model, tokens, torch.arange(len(batch), device=device),
                                                 last), answer)
            corrupt_total += float(base.sum())
            for chunk in chunks:
                replicas = len(chunk)
                rows = torch.arange(replicas * len(batch), device=device)
                logits = logits_at(model, tokens.repeat(replicas, 1), rows, last.repeat(replicas),
                                   _patch_hooks(chunk, mean_z, last, len(batch)))
                patched = _answer_probability(logits, answer.repeat(replicas)).view(replicas, len(batch))
                for r, (layer, head) in enumerate(chunk):
                    rise[layer * layout.n_heads + head] += float((patched[r] - base).sum())
                bar.update()
        bar.close()
    aie = (rise / len(shuffled)).view(layout.n_layers, layout.n_heads)
    order = torch.sort(-aie.flatten(), stable=True).indices[:top_k]
    return FunctionVectorHeads(
        aie=aie, heads=[divmod(int(i), layout.n_heads) for i in order],
        clean_probability=clean_total / len(clean), corrupt_probability=corrupt_total / len(shuffled),
        n_examples=len(shuffled), forward_passes=len(clean) + len(shuffled) * (1 + n_total),
        seconds=time.perf_counter() - started,
    )


def _mean_last_z(model: TransformerLensModel, layout: adapter.HeadLayout, clean: GateData, batch_size: int,
                 device: torch.device) -> tuple[Float[Tensor, "layer head d_head"], float]:
    """Each head's ``hook_z`` at the last prompt position, averaged over the clean prompts, and the
    summed P(answer's first token) of those prompts."""
    n_layers = layout.n_layers
    total = torch.zeros(n_layers, layout.n_heads, layout.d_head, device=device)
    probability = 0.0
    for batch, tokens, target_mask in on_device(clean, batch_size, device):
        last, answer = _first_scored(tokens, target_mask, batch.targets_to(device))
        index = torch.arange(len(batch), device=device)
        hooks, captured = interventions.record(range(n_layers), positions=last)  # [batch, head, d_head]
        logits = logits_at(model, tokens, index, last, hooks)
        probability += float(_answer_probability(logits, answer).sum())
        total += torch.stack([captured[layer].float().sum(dim=0) for layer in range(n_layers)])
    return total / len(clean), probability


def _patch_hooks(chunk: list[Head], mean_z: Float[Tensor, "layer head d_head"], last: Int[Tensor, " batch"],
                 batch: int) -> list[interventions.Hook]:
    """Hooks that give replica ``r`` of the repeated batch head ``chunk[r]``'s mean at the last position."""
    return [interventions.replace(layer, mean_z[layer], heads=head, positions=last,
                                  rows=slice(replica * batch, (replica + 1) * batch))
            for replica, (layer, head) in enumerate(chunk)]


def _first_scored(
    tokens: Int[Tensor, "batch pos"], target_mask: Bool[Tensor, "batch pos"],
    targets: Int[Tensor, "batch pos"] | None,
) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Each example's first scored logit position (the last prompt position) and the answer token it
    is scored against, in either scoring mode of ``GateData``."""
    example, position = target_positions(target_mask, targets)
    labels = target_labels(tokens, target_mask, targets)
    first = torch.ones_like(example, dtype=torch.bool)
    first[1:] = example[1:] != example[:-1]  # positions come example by example; every example has one
    return position[first], labels[first]


def _answer_probability(logits: Float[Tensor, "n vocab"], answer: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    return logits.float().softmax(dim=-1).gather(-1, answer[:, None]).squeeze(-1).cpu()


def _require_same_answers(clean: GateData, shuffled: GateData) -> None:
    """The effect is measured on the clean answer, so the twin must keep it (only labels move)."""
    _, clean_first = _first_scored(clean.tokens, clean.target_mask, clean.targets)
    _, twin_first = _first_scored(shuffled.tokens, shuffled.target_mask, shuffled.targets)
    differs = torch.nonzero(clean_first != twin_first).flatten()
    if len(differs):
        raise InputError(
            f"corrupt: example {int(differs[0])}'s answer differs from the clean answer; function-vector "
            "patching needs the same queries and answers with only the demonstration labels shuffled "
            "(e.g. tasks.function(model, ..., corrupt='shuffled_labels'))."
        )
