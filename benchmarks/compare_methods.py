"""Every head-scoring method on every benchmark model: who finds the heads that matter, at what cost.

    python benchmarks/compare_methods.py OUT_DIR [--skip-real] [--skip-trained] [--methods a,b]
                                                 [--n 64] [--real-n 16] [--real-tasks induction,sva,ioi]

Benchmarks with known roles (``chg_tlens.benchmark_models``): four planted circuits and a 2-layer model
trained here whose roles come from its attention patterns. Then, unless ``--skip-real``, the embedded
SmolLM2-135M on built-in tasks, where only the induction task has a reference (heads whose attention
patterns say "induction head"); the others get faithfulness and cost only.

Per method x benchmark: ROC AUC and precision at k for the facilitating heads, faithfulness at k (the
task with only the method's top-k heads kept, 1 = as good as the full model), and cost (example
forward/backward passes, seconds). Scores are fitted on one data draw and faithfulness measured on
another. Writes ``results.json`` and ``results.md`` into OUT_DIR and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' patching draws a bar per call

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from chg_tlens import benchmark_models  # noqa: E402
from chg_tlens.baselines import HeadScores  # noqa: E402
from chg_tlens.compare import (  # noqa: E402
    METHODS,
    MethodSettings,
    faithfulness_curve,
    run_methods,
    spearman,
    truth_metrics,
)
from chg_tlens.data import GateData  # noqa: E402
from chg_tlens.fit import CHGConfig  # noqa: E402

REAL_INDUCTION_THRESHOLD = 0.4
"""On SmolLM2, a head whose mean attention on the induction position exceeds this is a reference head."""
REAL_K_SHARE = 0.1
"""Without a reference set, faithfulness is measured at this share of all heads."""


@dataclass
class Benchmark:
    name: str
    model: Any
    fit_data: GateData
    eval_data: GateData
    roles: np.ndarray | None
    k: int
    settings: MethodSettings
    note: str = ""


def main() -> None:
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.methods is None else args.methods.split(",")
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    for benchmark in benchmarks(args):
        started = time.time()
        scored, skipped = run_methods(benchmark.model, benchmark.fit_data, methods, benchmark.settings)
        rows.extend(evaluate(benchmark, scored))
        details[benchmark.name] = {
            "note": benchmark.note, "k": benchmark.k, "skipped": skipped,
            "roles": None if benchmark.roles is None else benchmark.roles.tolist(),
            "scores": {s.method: s.scores.tolist() for s in scored},
            "details": {s.method: _jsonable(s.details) for s in scored},
            "seconds": round(time.time() - started, 1),
        }
        print(f"[{benchmark.name}] {len(scored)} scores in {time.time() - started:.1f} s", flush=True)
    frame = pd.DataFrame(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "benchmarks": details}, indent=2,
                                                 default=_jsonable))
    markdown = to_markdown(frame, details)
    (out / "results.md").write_text(markdown)
    print(markdown)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for results.json and results.md")
    parser.add_argument("--skip-real", action="store_true", help="skip the SmolLM2-135M tasks")
    parser.add_argument("--skip-trained", action="store_true", help="skip the model trained here")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--n", type=int, default=64, help="examples per benchmark-model data draw")
    parser.add_argument("--real-n", type=int, default=8, help="examples per SmolLM2 task")
    parser.add_argument("--real-steps", type=int, default=20,
                        help="updates per CHG stage and of subnetwork probing on SmolLM2")
    parser.add_argument("--real-tasks", default="induction,ioi", help="comma-separated task names")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return parser.parse_args()


def benchmarks(args: argparse.Namespace):
    """Benchmark models first (known roles), then the real model's tasks."""
    small = MethodSettings()
    for circuit in benchmark_models.all_benchmarks(include_trained=not args.skip_trained):
        roles = circuit.true_roles()
        yield Benchmark(circuit.name, circuit.model, circuit.data(args.n, 0), circuit.data(args.n, 1),
                        roles, int((roles == "facilitating").sum()), small, circuit.description)
    if args.skip_real:
        return
    from chg_tlens.models import load_model
    from chg_tlens.tasks import make_task

    model = load_model("smollm2-135m", device="cpu")
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    real = MethodSettings(batch_size=args.real_n, subnetwork_steps=args.real_steps,
                          chg=CHGConfig(n_seeds=2, steps=args.real_steps, batch_size=args.real_n,
                                        progress=False))
    for task in args.real_tasks.split(","):
        options = {"seq_len": 8} if task == "induction" else {}
        fit_data = make_task(task, model, n=args.real_n, seed=0, **options)
        eval_data = make_task(task, model, n=args.real_n, seed=1, **options)
        roles, note = None, "no reference roles"
        k = max(1, round(REAL_K_SHARE * n_heads))
        if task == "induction":
            roles = induction_reference(model, fit_data)
            k = max(1, int((roles == "facilitating").sum()))
            note = f"reference: attention-pattern induction score > {REAL_INDUCTION_THRESHOLD}"
        yield Benchmark(f"smollm2/{task}", model, fit_data, eval_data, roles, k, real, note)


def induction_reference(model: Any, data: GateData) -> np.ndarray:
    """Heads whose attention goes to the token after the current token's earlier occurrence."""
    seq_len = int(data.meta["options"]["seq_len"])
    n = len(data)
    scores = benchmark_models.attention_diagnostics(
        model, data.tokens, torch.full((n,), seq_len), torch.ones(n, dtype=torch.long))
    flagged = scores["induction"] > REAL_INDUCTION_THRESHOLD
    return np.where(flagged.numpy(), "facilitating", "irrelevant").astype(object)


def evaluate(benchmark: Benchmark, scored: list[HeadScores]) -> list[dict[str, Any]]:
    """One row per method: truth metrics, faithfulness at k, agreement with CHG, cost."""
    reference = next((s for s in scored if s.method == "chg_max"), None)
    rows = []
    for item in scored:
        curve = faithfulness_curve(benchmark.model, benchmark.eval_data, item, ks=[benchmark.k])
        row: dict[str, Any] = {
            "benchmark": benchmark.name, "method": item.method, "k": benchmark.k,
            "auc": None, "precision_at_k": None,
            "faithfulness_at_k": float(curve["faithfulness"].iloc[0]),
            "logprob_at_k": float(curve["logprob"].iloc[0]),
            "logprob_all": float(curve["logprob_all"].iloc[0]),
            "spearman_vs_chg": None if reference is None else spearman(item, reference),
            **item.cost(),
        }
        has_both = benchmark.roles is not None and 0 < (benchmark.roles == "facilitating").sum() < \
            benchmark.roles.size
        if has_both:
            truth = truth_metrics(item, benchmark.roles, k=benchmark.k)
            row["auc"], row["precision_at_k"] = truth["auc"], truth["precision_at_k"]
        labels = item.details.get("role_labels")
        if item.method == "chg_max" and labels is not None and benchmark.roles is not None:
            row["chg_role_accuracy"] = float(np.mean(labels == benchmark.roles[None]))
            needed = benchmark.roles == "facilitating"
            row["chg_facilitating_found_every_seed"] = float(np.mean(
                np.all(labels[:, needed] == "facilitating", axis=0))) if needed.any() else None
        rows.append(row)
    return rows


def to_markdown(frame: pd.DataFrame, details: dict[str, Any]) -> str:
    lines = ["# Head-scoring methods on benchmarks with known roles", ""]
    lines.append("Positives = heads whose true role is *facilitating*. AUC: chance 0.5, perfect 1. "
                 "Faithfulness at k: mean target log-prob with only the method's top-k heads kept, "
                 "scaled so 0 = no heads, 1 = all heads (above 1: the kept set beats the full model). "
                 "k = number of true facilitating heads (10% of heads where no reference exists).")
    lines.append("")
    for metric, title in (("auc", "ROC AUC (facilitating heads)"),
                          ("precision_at_k", "Precision at k"),
                          ("faithfulness_at_k", "Faithfulness at k"),
                          ("spearman_vs_chg", "Spearman correlation with CHG (max over seeds)"),
                          ("chg_role_accuracy", "CHG's own role labels: share of heads labelled as the "
                           "truth says (mean over seeds)"),
                          ("chg_facilitating_found_every_seed", "CHG: share of truly facilitating heads "
                           "labelled facilitating in every seed"),
                          ("forward_passes", "Cost: example forward passes"),
                          ("backward_passes", "Cost: example backward passes"),
                          ("seconds", "Cost: seconds")):
        if metric not in frame:
            continue
        table = frame.pivot_table(index="method", columns="benchmark", values=metric, aggfunc="first",
                                  sort=False, dropna=False)
        table = table.reindex(columns=list(details))
        if metric.startswith("chg_"):
            table = table.dropna(how="all")
        lines += [f"## {title}", "", _markdown_table(table, metric), ""]
    lines += ["## Benchmarks", ""]
    for name, info in details.items():
        skipped = ", ".join(f"{m} ({why})" for m, why in info["skipped"].items()) or "none"
        lines.append(f"- **{name}** (k = {info['k']}): {info['note']}. Skipped: {skipped}. "
                     f"{info['seconds']} s.")
    return "\n".join(lines) + "\n"


def _markdown_table(table: pd.DataFrame, metric: str) -> str:
    integer = metric.endswith("passes")
    header = "| method | " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|---|" + "---|" * len(table.columns)
    body = []
    for method, values in table.iterrows():
        cells = []
        for value in values:
            if value is None or (isinstance(value, float) and np.isnan(value)):
                cells.append("n/a")
            elif integer:
                cells.append(f"{int(value):,}")
            else:
                cells.append(f"{value:.3f}" if metric != "seconds" else f"{value:.1f}")
        body.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *body])


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


if __name__ == "__main__":
    main()
