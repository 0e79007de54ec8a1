"""Subject-verb agreement across an attractor: "The keys to the cabinet" -> " are".

The noun inside the prepositional phrase (the attractor) has, by default, the other grammatical number,
so copying the nearest noun's number gives the wrong verb. The twin flips the subject's number (and so
the answer), leaving the attractor as it was.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from chg_tlens.core.data import GateData
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.tasks.examples import (
    TextExample,
    examples_to_data,
    require_choice,
    require_count,
    require_tokenizer,
)
from chg_tlens.tasks.words import ATTRACTORS, NOUNS, PREPOSITIONS, single_token_pairs

ATTRACTOR_NUMBERS = ("opposite", "same", "random", "none")
"""Number of the attractor relative to the subject; ``none`` drops the prepositional phrase."""


def sva(
    model: TransformerLensModel,
    n: int = 64,
    seed: int = 0,
    *,
    attractor: str = "opposite",
    verbs: tuple[str, str] = (" is", " are"),
    nouns: Sequence[tuple[str, str]] | None = None,
) -> GateData:
    """Agreement prompts whose target is the verb (singular or plural, one token), with a twin.

    ``verbs`` is the (singular, plural) pair of answers; ``nouns`` (singular, plural) pairs with leading
    spaces, each a single token (the built-in list is filtered to those that are). Half the subjects
    are plural, drawn by ``seed``.
    """
    task = "sva"
    require_tokenizer(model, task)
    require_count(task, "n", n)
    require_count(task, "seed", seed, 0)
    require_choice(task, "attractor", attractor, ATTRACTOR_NUMBERS)
    verb_pair = single_token_pairs(model, [tuple(verbs)], task, "verb pair", minimum=1, strict=True)[0]
    subjects = single_token_pairs(model, NOUNS if nouns is None else nouns, task, "noun pair",
                                  minimum=2, strict=nouns is not None)
    attractors = single_token_pairs(model, ATTRACTORS, task, "attractor noun pair", minimum=2,
                                    strict=False)
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        subject = rng.choice(subjects)
        plural = rng.random() < 0.5
        phrase = ""
        if attractor != "none":
            other = rng.choice([pair for pair in attractors if pair[0] != subject[0]])
            if attractor == "random":
                attractor_plural = rng.random() < 0.5
            else:
                attractor_plural = plural if attractor == "same" else not plural
            phrase = f"{rng.choice(PREPOSITIONS)} the{other[attractor_plural]}"
        examples.append(TextExample(
            prompt=f"The{subject[plural]}{phrase}", answer=verb_pair[plural],
            corrupt_prompt=f"The{subject[not plural]}{phrase}", corrupt_answer=verb_pair[not plural],
            distractor=verb_pair[not plural],
        ))
    options = {"attractor": attractor, "verbs": list(verb_pair), "n_nouns": len(subjects)}
    return examples_to_data(model, task, examples, seed, options, corruption="subject_number")
