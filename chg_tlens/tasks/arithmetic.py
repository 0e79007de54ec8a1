"""Small additions: "12+7=" -> "19"; the loss counts the answer's tokens only.

A few solved examples can come first ("3+4=7\\n12+7="), which small models need to settle on the
format. The twin changes the second operand so the sum changes, keeping every token count the same.
"""

from __future__ import annotations

import random

from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError
from chg_tlens.models import adapter
from chg_tlens.models.protocol import TransformerLensModel
from chg_tlens.tasks.examples import TextExample, examples_to_data, require_count, require_tokenizer

_MAX_REDRAWS = 200


def arithmetic(
    model: TransformerLensModel,
    n: int = 64,
    seed: int = 0,
    *,
    max_operand: int = 20,
    n_shots: int = 3,
) -> GateData:
    """Addition prompts ``a+b=`` with operands in [0, ``max_operand``]; targets are the sum's tokens."""
    task = "arithmetic"
    require_tokenizer(model, task)
    require_count(task, "n", n)
    require_count(task, "seed", seed, 0)
    require_count(task, "max_operand", max_operand, 2)
    require_count(task, "n_shots", n_shots, 0)
    rng = random.Random(seed)

    def operand() -> int:
        return rng.randint(0, max_operand)

    def shape(text: str) -> int:
        return len(adapter.encode(model, text, prepend_bos=False))

    examples = []
    for _ in range(n):
        shots = "".join(f"{x}+{y}={x + y}\n" for x, y in ((operand(), operand()) for _ in range(n_shots)))
        a, b = operand(), operand()
        prompt = f"{shots}{a}+{b}="
        for _ in range(_MAX_REDRAWS):
            other = operand()
            corrupt_prompt = f"{shots}{a}+{other}="
            if other != b and shape(corrupt_prompt) == shape(prompt) \
                    and shape(str(a + other)) == shape(str(a + b)):
                break
        else:
            raise InputError(
                f"{task}: found no second operand for {a}+{b} whose prompt and sum have the same token "
                f"counts as the original for this tokenizer; try a larger max_operand."
            )
        examples.append(TextExample(prompt, str(a + b), corrupt_prompt, str(a + other)))
    options = {"max_operand": max_operand, "n_shots": n_shots}
    return examples_to_data(model, task, examples, seed, options, corruption="second_operand")
