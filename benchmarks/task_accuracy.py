"""How well the embedded SmolLM2-135M does each built-in task before any gating: the table in the README.

    python benchmarks/task_accuracy.py OUT_DIR [--n 100]

A CHG fit is only meaningful on a task the model can do; this is the number to check first. Accuracy:
every target token is the top-1 prediction; contrast accuracy: the clean answer beats the corrupt
twin's answer on the clean prompt (the binary choice, e.g. are/is, IO/subject), where the task has one.
Writes ``task_accuracy.json`` and ``task_accuracy.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from chg_tlens import load_model
from chg_tlens.analysis.accuracy import task_accuracy
from chg_tlens.app.runs import write_json
from chg_tlens.tasks import make_task

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("ioi", "ioi", {}),
    ("sva", "sva", {}),
    ("induction", "induction", {}),
    ("aba", "aba_abb", {"rule": "aba"}),
    ("abb", "aba_abb", {"rule": "abb"}),
    ("arithmetic", "arithmetic", {}),
] + [
    (f"{function} ({view})", "function", {"function": function, "view": view})
    for function in ("plural", "antonym", "capital") for view in ("in_context", "instruction")
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m")
    rows = []
    for name, task, options in CASES:
        started = time.time()
        data = make_task(task, model, n=args.n, seed=0, **options)
        scores = task_accuracy(model, data, batch_size=16)
        rows.append({"case": name, "task": task, "options": options, **scores,
                     "seconds": round(time.time() - started, 1)})
        print(name, {k: round(v, 3) for k, v in scores.items() if isinstance(v, float)}, flush=True)
    write_json({"n": args.n, "model": "smollm2-135m", "rows": rows}, args.out / "task_accuracy.json")
    lines = ["| task | n | accuracy (top-1) | token accuracy | contrast accuracy | mean target log-prob |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        contrast = f"{row['contrast_accuracy']:.2f}" if "contrast_accuracy" in row else "-"
        lines.append(f"| {row['case']} | {row['n']} | {row['accuracy']:.2f} | {row['token_accuracy']:.2f} | "
                     f"{contrast} | {row['logprob']:.2f} |")
    (args.out / "task_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
