"""The paper's causal validations of CHG, on SmolLM2-135M, side by side with the paper's figures.

    python benchmarks/paper_checks.py docs/results/paper_checks            # every check; resumable
    python benchmarks/paper_checks.py OUT --checks function_vectors --n 16 --steps 100

Checks (Nam et al. 2025 and the papers they validate against):
    function_vectors   Todd et al.'s function-vector heads (top AIE on antonym) vs the rest, CHG max
                       facilitation over seeds on the same in-context task: Welch t (paper, Llama-3: 8.52)
    symbol_heads       Yang et al.'s symbol-abstraction / symbolic-induction / retrieval heads on ABA/ABB
                       vs the rest, same test (paper: t = 11.18), with SmolLM2's accuracy on the pairs
    targeted_ablation  from G+, heads in score order to 0 (and to 1): facilitating drop, irrelevant flat,
                       interfering rise, against random orders; on sva, ioi and antonym
    many_circuits      how many heads are facilitating or interfering in at least one seed (paper: 84%),
                       in every seed; seeds' overlap; each seed's set kept alone vs random sets (sva)

Every CHG fit is cached under OUT/fits/<task>/ (resumed from its checkpoint if interrupted); a long fit of
the convergence study (``--reuse``, same task and data) is used instead where one exists. Each check's
numbers go to OUT/checks/<check>.json as it finishes, so a rerun continues where the last one stopped;
OUT/paper_checks.{md,json} hold the table. Budgets are arguments, reported in every row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from convergence_study import resumable_fit  # benchmarks/ runs as scripts: this folder is on the path

from chg_tlens import CHGConfig, CHGResult, load_model, validate
from chg_tlens.app.markdown import markdown_table
from chg_tlens.errors import InputError
from chg_tlens.tasks import make_task

CHECKS = ("function_vectors", "symbol_heads", "targeted_ablation", "many_circuits")
FUNCTION_TASK = dict(function="antonym", corrupt="shuffled_labels")
"""The in-context task of the function-vector check (and the function task of the ablation check)."""
PAPER = {
    "function_vectors": "t = 8.52 (Llama-3-8B, function-vector heads vs rest)",
    "symbol_heads": "t = 11.18 (Llama-3, symbol heads vs rest)",
    "targeted_ablation": "facilitating: drop; irrelevant: flat; interfering: rise (Fig. 3)",
    "many_circuits": "84% of heads facilitating or interfering in at least one seed; few in all",
}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "checks").mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m")
    for name in args.checks:
        path = out / "checks" / f"{name}.json"
        if path.is_file():
            print(f"{name}: cached", flush=True)
            continue
        started = time.time()
        rows = RUNNERS[name](model, args, out)
        for row in rows:
            row.update(check=name, paper=PAPER[name], seconds=round(time.time() - started, 1))
        path.write_text(json.dumps(rows, indent=2, default=float))
        print(f"{name}: {time.time() - started:.0f} s", flush=True)
    write_tables(out, args)


# ------------------------------------------------------------------------------ fits
def chg_fit(model: Any, data: Any, task: str, args: argparse.Namespace, out: Path) -> tuple[CHGResult, str]:
    """The long convergence-study fit of ``task`` if there is one, else a cached fit at the given budget."""
    reused = Path(args.reuse) / task / "reference" / "result"
    if args.reuse and reused.exists():
        result = CHGResult.load(reused)
        if result.provenance.get("data_fingerprint") in (None, data.fingerprint()):
            return result, f"convergence-study reference ({_budget(result)})"
    folder = out / "fits" / task
    if (folder / "result").exists():
        result = CHGResult.load(folder / "result")
        return result, _budget(result)
    config = CHGConfig(n_seeds=args.seeds, steps=args.steps, batch_size=args.batch, progress=False,
                       checkpoint_every=25)
    result = resumable_fit(model, data, folder, config)
    return result, _budget(result)


def _budget(result: CHGResult) -> str:
    config = result.config
    return f"{config['n_seeds']} seeds x {config['steps']} updates x batch {config['batch_size']}"


# ------------------------------------------------------------------------------ checks
def check_function_vectors(model: Any, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    data = make_task("function", model, n=args.n, seed=0, **FUNCTION_TASK)
    heads = validate.function_vector_heads(model, data, top_k=10, batch_size=args.patch_batch, progress=False)
    result, budget = chg_fit(model, data, "antonym", args, out)
    test = heads.mediation_test(result)
    return [{"task": "antonym", "smollm2": f"t = {test['t']:.2f}, p = {test['p']:.2g}",
             "holds": bool(test["t"] > 0 and test["p"] < 0.05), "budget": budget,
             "details": {"mediation": test, "heads": heads.heads, "clean_p": heads.clean_probability,
                         "shuffled_p": heads.corrupt_probability, "forward_passes": heads.forward_passes}}]


def check_symbol_heads(model: Any, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    accuracy = validate.symbol_task_accuracy(model, n=args.n)
    try:
        heads, filtered = validate.symbol_heads(model, n=args.n, progress=False), "pairs answered right"
    except InputError as error:  # the model is too weak on the pairs: score them all and say so
        if "only_correct" not in str(error):
            raise
        heads, filtered = validate.symbol_heads(model, n=args.n, progress=False, only_correct=False), (
            "all pairs (SmolLM2 answers too few right in both contexts)")
    data = make_task("aba_abb", model, n=args.n, seed=0, rule="mixed")
    result, budget = chg_fit(model, data, "aba_abb", args, out)
    tests = heads.mediation_test(result)
    rows = []
    for kind, test in tests.items():
        rows.append({"task": f"aba_abb / {kind}", "smollm2": f"t = {test['t']:.2f}, p = {test['p']:.2g}",
                     "holds": bool(test["t"] > 0 and test["p"] < 0.05), "budget": budget,
                     "details": {"mediation": test, "n_pairs": heads.n_pairs, "scored": filtered,
                                 "accuracy": accuracy}})
    return rows


def check_targeted_ablation(model: Any, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows = []
    for task, options in (("sva", {}), ("ioi", {}), ("antonym", FUNCTION_TASK)):
        data = make_task("function" if task == "antonym" else task, model, n=args.n, seed=0, **options)
        result, budget = chg_fit(model, data, task, args, out)
        frame = validate.targeted_ablation(model, data, result, max_heads=args.max_heads,
                                           n_random=args.random_orders, batch_size=args.patch_batch)
        summary = validate.ablation_summary(frame)
        for record in summary.to_dict("records"):
            verdict = record.get("as_expected")
            rows.append({"task": f"{task} / {record['score']} ({record['start']} -> {record['value']})",
                         "smollm2": f"{record['delta_logprob']:+.3f} nats at k = {record.get('k')}",
                         "holds": None if verdict is None or verdict != verdict else bool(verdict),
                         "budget": f"{budget}; {args.max_heads} heads per curve, {args.random_orders} random "
                                   "orders",
                         "details": record})
    return rows


def check_many_circuits(model: Any, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    data = make_task("sva", model, n=args.n, seed=0)
    result, budget = chg_fit(model, data, "sva", args, out)
    circuits = validate.sufficient_circuits(model, data, result, n_random=args.random_orders,
                                            batch_size=args.patch_batch)
    counts = circuits.counts()
    per_seed = circuits.per_seed()
    share = counts["share_facilitating_or_interfering_any"]
    return [{"task": "sva", "smollm2": (f"{share:.0%} facilitating or interfering in >= 1 seed; "
                                       f"{counts['facilitating_every']} facilitating in every seed of "
                                       f"{counts['n_seeds']}; mean Jaccard {counts['mean_jaccard']:.2f}; "
                                       f"sets beat random in {per_seed['beats_random_share'].mean():.0%}"),
             "holds": bool(share >= 0.5
                           and counts["facilitating_every"] < min(counts["facilitating_per_seed"])),
             "budget": budget, "details": {"counts": counts, "per_seed": per_seed.to_dict("records")}}]


RUNNERS = {"function_vectors": check_function_vectors, "symbol_heads": check_symbol_heads,
           "targeted_ablation": check_targeted_ablation, "many_circuits": check_many_circuits}


# ------------------------------------------------------------------------------ tables
def write_tables(out: Path, args: argparse.Namespace) -> None:
    import pandas as pd

    rows = []
    for name in CHECKS:
        path = out / "checks" / f"{name}.json"
        if path.is_file():
            rows.extend(json.loads(path.read_text()))
    (out / "paper_checks.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2,
                                                      default=str))
    columns = ["check", "task", "paper", "smollm2", "holds", "budget", "seconds"]
    frame = pd.DataFrame(rows)
    body = markdown_table(frame[columns]) if len(frame) else "(no checks run yet)"
    text = ["# The paper's validations on SmolLM2-135M-Instruct", "",
            f"`python benchmarks/paper_checks.py {args.out}`; {args.n} prompts per task. 'holds': the "
            "paper's direction at p < 0.05 (mediation), the predicted sign outside the tolerance (ablation).",
            "", body, ""]
    (out / "paper_checks.md").write_text("\n".join(text))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for fits, each check's JSON and the tables (rerun to continue)")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    parser.add_argument("--n", type=int, default=64, help="prompts per task")
    parser.add_argument("--steps", type=int, default=100, help="CHG updates per stage where no fit is reused")
    parser.add_argument("--batch", type=int, default=8, help="CHG batch size")
    parser.add_argument("--seeds", type=int, default=3, help="CHG seeds")
    parser.add_argument("--reuse", default="docs/results/convergence_study/fits",
                        help="convergence-study fits to reuse where task and data match ('' for none)")
    parser.add_argument("--max-heads", type=int, default=60, help="heads per ablation curve")
    parser.add_argument("--random-orders", type=int, default=3, help="random orders per reference band")
    parser.add_argument("--patch-batch", type=int, default=32, help="rows per forward when patching")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


if __name__ == "__main__":
    main()
