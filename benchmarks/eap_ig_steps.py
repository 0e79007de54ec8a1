"""How many integrated-gradient steps EAP-IG needs: its scores at 1..32 steps, side by side in one run.

    python benchmarks/eap_ig_steps.py docs/results/eap_ig_steps                 # resumable
    python benchmarks/eap_ig_steps.py OUT --steps 1,2,4,8 --benchmarks composite

EAP-IG (Hanna et al. 2024) estimates denoising activation patching (each head's clean output patched
into the corrupt run) from gradients along inputs interpolated from the corrupt prompt to the clean one;
one step is attribution patching. Every step count here comes from one run of the largest
(``baselines.eap_ig_sweep``: the left Riemann sums' points nest). Per benchmark and step count:
ROC AUC against the reference heads, Pearson and Spearman correlation with denoising activation patching
(the quantity EAP-IG estimates) and Spearman with the most steps, with each count's own passes and
seconds.

Benchmarks: ``composite`` (the 32-head known-role model; its patching is computed here) and SmolLM2-135M
on ``induction`` and ``ioi`` (64 prompts, the data and references of ``chg-tlens compare --task``;
patching is read from that comparison's ``results.json``, after checking that 1 step reproduces the
attribution patching stored beside it, i.e. that the data are the same; so ``--steps`` must include 1).
Each benchmark's rows go to OUT/benchmarks/<name>.json as it finishes; OUT/results.{json,md} hold the
table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from chg_tlens import load_model
from chg_tlens.analysis import baselines, compare
from chg_tlens.analysis.metrics import flat_scores, roc_auc, spearman
from chg_tlens.app.markdown import markdown_table
from chg_tlens.errors import InputError

BENCHMARKS = ("composite", "induction", "ioi")
SMOLLM2_COMPARISON = Path("docs/results/compare_smollm2")
"""Where ``chg-tlens compare --task`` left SmolLM2's patching scores (one folder per task)."""
SAME_DATA_TOLERANCE = 1e-3
"""Largest |1-step EAP-IG - stored attribution patching| (nats) accepted as "the same data"."""


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "benchmarks").mkdir(parents=True, exist_ok=True)
    smollm2 = None
    for name in args.benchmarks:
        path = out / "benchmarks" / f"{name}.json"
        if path.is_file():
            print(f"{name}: cached", flush=True)
            continue
        started = time.time()
        if name == "composite":
            benchmark, patching, attribution = composite(args.n)
        else:
            smollm2 = smollm2 or load_model("smollm2-135m", device="cpu")
            benchmark, patching, attribution = smollm2_task(smollm2, name, args.comparison)
        sweep = baselines.eap_ig_sweep(benchmark.model, benchmark.fit_data, args.steps, args.batch_size)
        gap = same_data_gap(sweep, attribution, name)
        rows = step_rows(benchmark, sweep, patching)
        for row in rows:
            row.update(benchmark=name, one_step_vs_attribution_patching=gap)
        path.write_text(json.dumps(rows, indent=2, default=float))
        print(f"{name}: {time.time() - started:.0f} s", flush=True)
    write_tables(out, args)


def composite(n: int) -> tuple[compare.Benchmark, torch.Tensor, torch.Tensor]:
    """The known-role composite model, with denoising and attribution patching computed on its data."""
    benchmark = next(b for b in compare.known_role_benchmarks(n, include_trained=False)
                     if b.name.startswith("composite"))
    model, data = benchmark.model, benchmark.fit_data
    return (benchmark, baselines.activation_patching(model, data, "denoise").scores,
            baselines.attribution_patching(model, data).scores)


def smollm2_task(model: Any, task: str,
                 comparison: Path) -> tuple[compare.Benchmark, torch.Tensor, torch.Tensor]:
    """SmolLM2 on a built-in task as ``chg-tlens compare --task-n 64`` builds it, with that run's denoising
    and attribution patching."""
    benchmark = compare.task_benchmark(model, "smollm2-135m", task, n=64)
    stored = json.loads((comparison / task / "results.json").read_text())["benchmarks"][benchmark.name]
    scores = stored["scores"]
    return (benchmark, torch.tensor(scores["activation_patching_denoise"]),
            torch.tensor(scores["attribution_patching"]))


def same_data_gap(sweep: list[baselines.HeadScores], attribution: torch.Tensor, name: str) -> float:
    """1-step EAP-IG is attribution patching: a gap says the patching scores came from other data."""
    if sweep[0].details["steps"] != 1:
        raise InputError(f"--steps must include 1 (checked against attribution patching), got "
                         f"{[item.details['steps'] for item in sweep]}.")
    gap = float((sweep[0].scores - attribution).abs().max())
    if gap > SAME_DATA_TOLERANCE:
        raise InputError(f"{name}: 1-step EAP-IG differs from the stored attribution patching by {gap:.2e}: "
                         "the stored scores were measured on other data; rerun chg-tlens compare on it.")
    return gap


def step_rows(benchmark: compare.Benchmark, sweep: list[baselines.HeadScores],
              patching: torch.Tensor) -> list[dict[str, Any]]:
    """One row per step count: agreement with the reference, with patching and with the most steps."""
    most = flat_scores(sweep[-1].scores)
    target = flat_scores(patching)
    positives = benchmark.roles == "facilitating"
    rows = []
    for item in sweep:
        values = flat_scores(item.scores)
        rows.append({
            "steps": item.details["steps"],
            "auc": roc_auc(item.scores, positives) if benchmark.roles is not None else None,
            "pearson_vs_patching": float(np.corrcoef(values, target)[0, 1]),
            "spearman_vs_patching": spearman(values, target),
            "spearman_vs_most_steps": spearman(values, most),
            "relative_change_vs_most_steps": float(np.linalg.norm(values - most) / np.linalg.norm(most)),
            "forward_passes": item.forward_passes, "backward_passes": item.backward_passes,
            "seconds": round(item.seconds, 3), "n_heads": len(values),
            "n_reference": int(positives.sum()) if benchmark.roles is not None else 0,
        })
    return rows


def write_tables(out: Path, args: argparse.Namespace) -> None:
    rows = []
    for name in BENCHMARKS:
        path = out / "benchmarks" / f"{name}.json"
        if path.is_file():
            rows.extend(json.loads(path.read_text()))
    (out / "results.json").write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=2,
                                                 default=float))
    if not rows:
        return
    frame = pd.DataFrame(rows)[["benchmark", "steps", "auc", "pearson_vs_patching", "spearman_vs_patching",
                                "spearman_vs_most_steps", "relative_change_vs_most_steps",
                                "forward_passes", "backward_passes", "seconds"]]
    text = ("# EAP-IG against its step count\n\n"
            f"`python benchmarks/eap_ig_steps.py {out}`; every count read off one run of the largest "
            "(`baselines.eap_ig_sweep`); passes and seconds are each count's own. AUC against the reference "
            "heads; correlations with denoising activation patching over all heads.\n\n"
            + markdown_table(frame) + "\n")
    (out / "results.md").write_text(text)
    print(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for the results (a rerun continues it)")
    parser.add_argument("--benchmarks", type=lambda s: [b for b in s.split(",") if b],
                        default=list(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--steps", type=lambda s: sorted(int(v) for v in s.split(",")),
                        default=list(baselines.EAP_IG_STEP_SWEEP),
                        help="step counts, 1 among them (each divides the largest)")
    parser.add_argument("--n", type=int, default=64, help="examples on the composite model")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward")
    parser.add_argument("--comparison", type=Path, default=SMOLLM2_COMPARISON,
                        help="folder of the SmolLM2 comparison whose patching scores are the target")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    unknown = [b for b in args.benchmarks if b not in BENCHMARKS]
    if unknown:
        parser.error(f"--benchmarks: unknown {unknown}; choose from {list(BENCHMARKS)}")
    return args


if __name__ == "__main__":
    main()
