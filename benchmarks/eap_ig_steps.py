"""How many integrated-gradient steps EAP-IG needs: its scores at 1..32 steps, side by side in one run.

    python benchmarks/eap_ig_steps.py docs/results/eap_ig_steps                 # resumable
    python benchmarks/eap_ig_steps.py OUT --steps 1,2,4,8 --benchmarks composite

EAP-IG (Hanna et al. 2024) is offered as a more faithful stand-in for activation patching: attribution
patching (a first-order estimate of denoising patching, each head's clean output patched into the corrupt
run) with gradients averaged along inputs interpolated from the corrupt prompt to the clean one. This study
reads the *left* Riemann sums (alpha = k/m, k = 0..m-1; ``riemann="left"``), whose one step is attribution
patching at the corrupt run, the row every other count is read against; the library's default is Hanna et
al.'s right sum (k = 1..m, whose one step is EAP at the clean run). Every step count here comes from one run
of the largest (``baselines.eap_ig_sweep``: the points nest). Per benchmark and step count: ROC AUC
against the reference heads, Pearson and Spearman correlation with denoising activation patching over all
heads, Spearman with the most steps, and each count's own passes and seconds.

Benchmarks: ``composite`` (the 32-head known-role model; its patching is computed here) and SmolLM2-135M
on ``induction`` and ``ioi`` (64 prompts, the data and references of ``chg-tlens compare --task``;
patching is read from that comparison's ``results.json``, after checking that attribution patching here
reproduces the one stored beside it, i.e. that the data are the same). ``--steps`` must include 1, the
attribution-patching row.
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
SMOLLM2_N = 64
"""Prompts per SmolLM2 task: those of the stored comparison."""
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
        settings = run_settings(args, name)
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored["settings"] != settings:
                raise InputError(f"{path} was measured with {stored['settings']}, not {settings}: "
                                 "give another OUT folder (nothing there was changed).")
            print(f"{name}: cached", flush=True)
            continue
        started = time.time()
        gap = None  # only stored scores need the same-data check
        if name == "composite":
            benchmark, patching = composite(args.n)
        else:
            stored_scores = comparison_scores(args.comparison, name)  # before minutes of model loading
            smollm2 = load_model("smollm2-135m", device="cpu") if smollm2 is None else smollm2
            benchmark = compare.task_benchmark(smollm2, "smollm2-135m", name, n=SMOLLM2_N)
            patching, attribution = (torch.tensor(stored_scores[method]) for method in
                                     ("activation_patching_denoise", "attribution_patching"))
            gap = same_data_gap(benchmark, attribution, args.batch_size, name)
        sweep = baselines.eap_ig_sweep(benchmark.model, benchmark.fit_data, args.steps, args.batch_size,
                                       riemann="left")
        rows = step_rows(benchmark, sweep, patching)
        for row in rows:
            row.update(benchmark=name, one_step_vs_attribution_patching=gap)
        shared_run = sweep[-1].details["shared_run"] | {"seconds": sweep[-1].seconds}
        path.write_text(json.dumps({"settings": settings, "rows": rows, "shared_run": shared_run},
                                   indent=2, default=float))
        print(f"{name}: {time.time() - started:.0f} s", flush=True)
    write_tables(out, args)


def run_settings(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """What a benchmark's rows depend on: a rerun with other settings must not reuse them."""
    data = {"n": args.n} if name == "composite" else {"n": SMOLLM2_N, "comparison": str(args.comparison)}
    return {"steps": args.steps, "batch_size": args.batch_size, **data}


def composite(n: int) -> tuple[compare.Benchmark, torch.Tensor]:
    """The known-role composite model, with denoising patching computed on its data."""
    benchmark = next(b for b in compare.known_role_benchmarks(n, include_trained=False)
                     if b.name.startswith("composite"))
    return benchmark, baselines.activation_patching(benchmark.model, benchmark.fit_data, "denoise").scores


def comparison_scores(comparison: Path, task: str) -> dict[str, list]:
    """The head scores ``chg-tlens compare --task TASK --task-n 64`` stored for SmolLM2."""
    path = comparison / task / "results.json"
    if not path.is_file():
        raise InputError(f"{path} not found: run chg-tlens compare --task {task} --task-n {SMOLLM2_N} first "
                         "(README, 'CHG against other methods'), or name its folder with --comparison.")
    return json.loads(path.read_text())["benchmarks"][f"smollm2-135m/{task}"]["scores"]


def same_data_gap(benchmark: compare.Benchmark, attribution: torch.Tensor, batch_size: int,
                  name: str) -> float:
    """Attribution patching (1-step EAP-IG) here against the stored one: a gap says the stored patching
    scores were measured on other data. Two forwards and a backward, before the sweep's many."""
    here = baselines.attribution_patching(benchmark.model, benchmark.fit_data, backend="hooks",
                                          batch_size=batch_size).scores
    gap = float((here - attribution).abs().max())
    if gap > SAME_DATA_TOLERANCE:
        raise InputError(f"{name}: attribution patching here differs from the stored one by {gap:.2e}: the "
                         "stored scores were measured on other data; rerun chg-tlens compare on it.")
    return gap


def step_rows(benchmark: compare.Benchmark, sweep: list[baselines.HeadScores],
              patching: torch.Tensor) -> list[dict[str, Any]]:
    """One row per step count: agreement with the reference, with patching and with the most steps."""
    most = flat_scores(sweep[-1].scores)
    target = flat_scores(patching)
    positives = None if benchmark.roles is None else benchmark.roles == "facilitating"
    rows = []
    for item in sweep:
        values = flat_scores(item.scores)
        rows.append({
            "steps": item.details["steps"],
            "auc": roc_auc(item.scores, positives) if positives is not None and positives.any() else None,
            "pearson_vs_patching": float(np.corrcoef(values, target)[0, 1]),
            "spearman_vs_patching": spearman(values, target),
            "spearman_vs_most_steps": spearman(values, most),
            "relative_change_vs_most_steps": float(np.linalg.norm(values - most) / np.linalg.norm(most)),
            "forward_passes": item.forward_passes, "backward_passes": item.backward_passes,
            "seconds": round(item.seconds, 3), "n_heads": len(values),
            "n_reference": 0 if positives is None else int(positives.sum()),
        })
    return rows


def write_tables(out: Path, args: argparse.Namespace) -> None:
    rows = []
    for name in args.benchmarks:
        rows.extend(json.loads((out / "benchmarks" / f"{name}.json").read_text())["rows"])
    (out / "results.json").write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=2,
                                                 default=float))
    if not rows:
        return
    frame = pd.DataFrame(rows)[["benchmark", "steps", "auc", "pearson_vs_patching", "spearman_vs_patching",
                                "spearman_vs_most_steps", "relative_change_vs_most_steps",
                                "forward_passes", "backward_passes", "seconds"]]
    text = ("# EAP-IG against its step count\n\n"
            f"`python benchmarks/eap_ig_steps.py {out}`; every count read off one run of the largest "
            "(`baselines.eap_ig_sweep(..., riemann='left')`: left sums, 1 step = attribution patching); "
            "passes and seconds are each count's own. AUC against the reference "
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
    parser.add_argument("--steps", type=lambda text: [int(v) for v in text.split(",") if v.strip()],
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
    try:
        args.steps = baselines.eap_ig_step_counts(args.steps)
    except InputError as error:
        parser.error(f"--steps: {error}")
    if args.steps[0] != 1:
        parser.error(f"--steps must include 1 (attribution patching, the row the others are read against), "
                     f"got {args.steps}")
    return args


if __name__ == "__main__":
    main()
