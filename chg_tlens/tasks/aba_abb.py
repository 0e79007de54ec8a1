"""Abstract patterns: in-context lines that follow A-B-A (or A-B-B), then a line to complete.

    "dog cat dog\\nsun map sun\\nred box" -> " red"     (ABA)
    "dog cat cat\\nsun map map\\nred box" -> " box"     (ABB)

Every word occurs once per prompt, so the answer can only come from the abstract rule, not from a
memorised pair. The twin uses the same words under the other rule, so its answer is the other word.
Four example lines by default: with two, SmolLM2-135M is at chance on ABB.

``paired_contexts`` builds the matched context pairs of Yang et al.'s (2025) causal mediation analysis
of symbol heads on the same prompts: a *source* context whose activations are patched into a *target*
context, either with the rule flipped but the third words unchanged ("abstract") or with the same rule
and only the query's two words swapped ("token").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import target_positions
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.tasks.examples import (
    TextExample,
    examples_to_data,
    require_choice,
    require_count,
    require_tokenizer,
)
from chg_tlens.tasks.words import PATTERN_WORDS, single_token_words

RULES = ("aba", "abb", "mixed")
"""``mixed`` draws the rule per example (half ABA, half ABB on average)."""

PAIR_KINDS = ("abstract", "token")
"""``abstract``: the target flips the rule but keeps every third word (symbol abstraction and symbolic
induction heads); ``token``: the same rule with the query's words swapped (retrieval heads)."""
PAIR_RULES = ("aba", "abb", "both")
"""The source context's rule; ``both`` alternates ABA and ABB pair by pair, so effects that follow one
rule's literal layout (a head copying the last word) cancel out."""


def aba_abb(model: TransformerLensModel, n: int = 64, seed: int = 0, *, rule: str = "aba", n_shots: int = 4,
            words: Sequence[str] | None = None) -> GateData:
    """Pattern-completion prompts with ``n_shots`` example lines; the target is the last word.

    ``words`` (with leading space, e.g. " dog") must each be one token; the built-in list is filtered
    to those that are. The twin applies the other rule to the same words.
    """
    task = "aba_abb"
    require_choice(task, "rule", rule, RULES)
    pool = _word_pool(model, n, seed, n_shots, words)
    rng = random.Random(seed)
    examples = []
    rules = []
    for _ in range(n):
        example_rule = rng.choice(("aba", "abb")) if rule == "mixed" else rule
        other_rule = "abb" if example_rule == "aba" else "aba"
        pairs = _draw_pairs(rng, pool, n_shots)
        query_a, query_b = pairs[-1]
        answer, other = (query_a, query_b) if example_rule == "aba" else (query_b, query_a)
        examples.append(TextExample(
            prompt=_prompt(pairs, example_rule), answer=answer,
            corrupt_prompt=_prompt(pairs, other_rule), corrupt_answer=other, distractor=other,
        ))
        rules.append(example_rule)
    options = {"rule": rule, "n_shots": n_shots, "n_words": len(pool)}
    return examples_to_data(model, task, examples, seed, options, corruption="other_rule",
                            extra_meta={"rules": rules})


def _prompt(pairs: list[tuple[str, str]], rule: str) -> str:
    """Example lines under ``rule``, then the query line without its last word."""
    lines = [f"{a.strip()}{b}{a if rule == 'aba' else b}" for a, b in pairs[:-1]]
    query_a, query_b = pairs[-1]
    return "\n".join([*lines, f"{query_a.strip()}{query_b}"])


@dataclass(frozen=True)
class PairedContexts:
    """Matched context pairs for patching a head's output from ``source`` (Yang et al.'s c2) into
    ``target`` (c1), position by position.

    Both hold one single-token answer per example, at the same position, with a twin (``corrupt``)
    whose answer is the *other* query word. For ``target`` that other word is the answer a head
    carrying the patched variable should produce: the score of a patch is the rise of
    ``logit(target twin's answer) - logit(target answer)`` on the target prompt.
    """

    kind: str
    source: GateData
    target: GateData
    item_positions: Bool[Tensor, "example pos"]
    """The third word of every example line (not the query): the same token in source and target."""
    rules: list[str] = field(default_factory=list)
    """The source context's rule per pair."""

    def __post_init__(self) -> None:
        if self.kind not in PAIR_KINDS:
            raise InputError(f"PairedContexts.kind must be one of {list(PAIR_KINDS)}, got {self.kind!r}.")
        for name, side in (("source", self.source), ("target", self.target)):
            if not isinstance(side, GateData) or side.per_position:
                raise InputError(
                    f"PairedContexts.{name}: expected next-token GateData, got {type(side).__name__}."
                )
            if side.corrupt is None or not torch.equal(side.corrupt.target_mask, side.target_mask):
                raise InputError(
                    f"PairedContexts.{name}: needs a twin (corrupt) with the other answer at the same "
                    "position."
                )
            if not bool((side.target_mask.sum(dim=1) == 1).all()):
                raise InputError(f"PairedContexts.{name}: every example needs exactly one answer token.")
        if (self.source.tokens.shape != self.target.tokens.shape
                or not torch.equal(self.source.lengths, self.target.lengths)
                or not torch.equal(self.source.target_mask, self.target.target_mask)):
            raise InputError(
                "PairedContexts: source and target must have the same token layout pair by pair "
                f"(tokens {list(self.source.tokens.shape)} vs {list(self.target.tokens.shape)})."
            )
        if self.item_positions.shape != self.source.tokens.shape or self.item_positions.dtype != torch.bool:
            raise InputError(
                f"PairedContexts.item_positions: expected a boolean {list(self.source.tokens.shape)} mask, "
                f"got {self.item_positions.dtype} {list(self.item_positions.shape)}."
            )
        if not bool(self.item_positions.any(dim=1).all()):
            raise InputError("PairedContexts.item_positions: every pair needs at least one item position.")

    def __len__(self) -> int:
        return len(self.source)

    @property
    def final_positions(self) -> Bool[Tensor, "example pos"]:
        """The last prompt position of every pair, where the answer is predicted."""
        example, position = target_positions(self.target.target_mask)
        final = torch.zeros_like(self.item_positions)
        final[example, position] = True
        return final

    def subset(self, index: Int[Tensor, " n"] | Sequence[int]) -> PairedContexts:
        """The pairs at ``index``, trimmed to their longest length."""
        index = torch.as_tensor(index, dtype=torch.long)
        source = self.source.subset(index)
        return replace(self, source=source, target=self.target.subset(index),
                       item_positions=self.item_positions[index, : source.tokens.shape[1]],
                       rules=[self.rules[i] for i in index.tolist()] if self.rules else [])


def paired_contexts(model: TransformerLensModel, n: int = 32, seed: int = 0, *, kind: str = "abstract",
                    rule: str = "both",
                    n_shots: int = 4, words: Sequence[str] | None = None) -> PairedContexts:
    """Yang et al.'s (2025) context pairs on this task's prompts, for patching symbol heads.

    ``abstract``: the source follows ``rule`` ("dog cat dog / red box" -> " red"); the target swaps the
    first two words of every line, query included, and keeps each third word ("cat dog dog / box red"
    -> " red" under the other rule). Third words and answers are the same tokens, only the abstract
    variable each third word stands for differs; a head carrying it moves the target's answer to
    " box". ``token``: the target keeps the source's example lines and rule and swaps the query's two
    words ("... / box red" -> " box"); a head carrying the literal answer moves it back to " red".
    A pair whose two contexts tokenize to different layouts is drawn again.
    """
    task = "aba_abb"
    require_choice(task, "kind", kind, PAIR_KINDS)
    require_choice(task, "rule", rule, PAIR_RULES)
    pool = _word_pool(model, n, seed, n_shots, words)
    bos = adapter.prepends_bos(model)
    rng = random.Random(seed)
    sources: list[TextExample] = []
    targets: list[TextExample] = []
    items: list[list[int]] = []
    rules: list[str] = []
    for _ in range(20 * n + 100):
        if len(sources) == n:
            break
        source_rule = ("aba", "abb")[len(sources) % 2] if rule == "both" else rule
        pairs = _draw_pairs(rng, pool, n_shots)
        if kind == "abstract":
            target_pairs, target_rule = [(b, a) for a, b in pairs], _other(source_rule)
        else:
            target_pairs, target_rule = [*pairs[:-1], pairs[-1][::-1]], source_rule
        where = _third_word_positions(model, pairs, source_rule, bos)
        if (where is None or where != _third_word_positions(model, target_pairs, target_rule, bos)
                or _prompt_length(model, pairs, source_rule, bos)
                != _prompt_length(model, target_pairs, target_rule, bos)):
            continue  # e.g. a query word that is one token after a space but two at a line start
        sources.append(_with_other_answer(pairs, source_rule))
        targets.append(_with_other_answer(target_pairs, target_rule))
        items.append(where)
        rules.append(source_rule)
    if len(sources) < n:
        raise InputError(
            f"{task}: only {len(sources)} of n={n} pairs have source and target contexts with the same "
            "token layout for this tokenizer; pass words that stay one token at the start of a line."
        )
    options = {"kind": kind, "rule": rule, "n_shots": n_shots, "n_words": len(pool)}
    source = examples_to_data(model, task, sources, seed, {**options, "side": "source"},
                              corruption="other_word", extra_meta={"rules": rules})
    target_rules = [_other(r) for r in rules] if kind == "abstract" else rules
    target = examples_to_data(model, task, targets, seed, {**options, "side": "target"},
                              corruption="other_word", extra_meta={"rules": target_rules})
    item_positions = torch.zeros(source.tokens.shape, dtype=torch.bool)
    for i, where in enumerate(items):
        item_positions[i, where] = True
    return PairedContexts(kind, source, target, item_positions, rules)


def _other(rule: str) -> str:
    return "abb" if rule == "aba" else "aba"


def _with_other_answer(pairs: list[tuple[str, str]], rule: str) -> TextExample:
    """The prompt of ``pairs`` under ``rule``; its twin asks for the query's other word."""
    query_a, query_b = pairs[-1]
    answer, other = (query_a, query_b) if rule == "aba" else (query_b, query_a)
    prompt = _prompt(pairs, rule)
    return TextExample(prompt=prompt, answer=answer, corrupt_prompt=prompt, corrupt_answer=other,
                       distractor=other)


def _prompt_length(model: TransformerLensModel, pairs: list[tuple[str, str]], rule: str, bos: bool) -> int:
    """Tokens in ``_prompt(pairs, rule)``: source and target must put the answer at the same position."""
    return len(adapter.encode(model, _prompt(pairs, rule), prepend_bos=bos))


def _third_word_positions(model: TransformerLensModel, pairs: list[tuple[str, str]], rule: str,
                          bos: bool) -> list[int] | None:
    """Token position of each example line's third word in ``_prompt(pairs, rule)``, or None when the
    tokenizer merges across a word boundary or splits a third word."""
    text = _prompt(pairs, rule)
    prompt, lines = adapter.encode(model, text, prepend_bos=bos), text.split("\n")
    positions = []
    for i, (a, b) in enumerate(pairs[:-1]):
        prefix = adapter.encode(model, "\n".join([*lines[:i], f"{a.strip()}{b}"]), prepend_bos=bos)
        third = adapter.encode(model, a if rule == "aba" else b, prepend_bos=False)
        at = len(prefix)
        if prompt[:at] != prefix or prompt[at : at + 1] != third:
            return None
        positions.append(at)
    return positions


def _word_pool(model: TransformerLensModel, n: int, seed: int, n_shots: int,
               words: Sequence[str] | None) -> list:
    """The checked counts and the single-token words both prompt builders draw from (two per line)."""
    task = "aba_abb"
    require_tokenizer(model, task)
    require_count(task, "n", n)
    require_count(task, "seed", seed, 0)
    require_count(task, "n_shots", n_shots, 1)
    return single_token_words(model, PATTERN_WORDS if words is None else words, task, "word",
                              minimum=2 * (n_shots + 1), strict=words is not None)


def _draw_pairs(rng: Any, pool: list, n_shots: int) -> list[tuple[str, str]]:
    """``n_shots + 1`` (A, B) word pairs, all words distinct: the example lines, then the query."""
    drawn = rng.sample(pool, 2 * (n_shots + 1))
    return [(drawn[2 * i], drawn[2 * i + 1]) for i in range(n_shots + 1)]
