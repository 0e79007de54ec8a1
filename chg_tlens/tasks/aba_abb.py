"""Abstract patterns: in-context lines that follow A-B-A (or A-B-B), then a line to complete.

    "dog cat dog\\nsun map sun\\nred box" -> " red"     (ABA)
    "dog cat cat\\nsun map map\\nred box" -> " box"     (ABB)

Every word occurs once per prompt, so the answer can only come from the abstract rule, not from a
memorised pair. The twin uses the same words under the other rule, so its answer is the other word.
Four example lines by default: with two, SmolLM2-135M is at chance on ABB.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from chg_tlens.core.data import GateData
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


def aba_abb(model: Any, n: int = 64, seed: int = 0, *, rule: str = "aba", n_shots: int = 4,
            words: Sequence[str] | None = None) -> GateData:
    """Pattern-completion prompts with ``n_shots`` example lines; the target is the last word.

    ``words`` (with leading space, e.g. " dog") must each be one token; the built-in list is filtered
    to those that are. The twin applies the other rule to the same words.
    """
    task = "aba_abb"
    require_tokenizer(model, task)
    require_count(task, "n", n)
    require_count(task, "seed", seed, 0)
    require_count(task, "n_shots", n_shots, 1)
    require_choice(task, "rule", rule, RULES)
    needed = 2 * (n_shots + 1)
    pool = single_token_words(model, PATTERN_WORDS if words is None else words, task, "word",
                              minimum=needed, strict=words is not None)
    rng = random.Random(seed)
    examples = []
    rules = []
    for _ in range(n):
        example_rule = rng.choice(("aba", "abb")) if rule == "mixed" else rule
        other_rule = "abb" if example_rule == "aba" else "aba"
        drawn = rng.sample(pool, needed)
        pairs = [(drawn[2 * i], drawn[2 * i + 1]) for i in range(n_shots + 1)]
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
