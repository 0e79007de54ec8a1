"""Validation study on the embedded SmolLM2-135M: does CHG agree with the tools people already trust?

    python benchmarks/validation_study.py OUT_DIR [--n 16] [--steps 40] [--n-seeds 3]

1. Induction: heads TransformerLens' head detector flags as induction heads on repeated random tokens,
   against CHG facilitation (max over seeds) on the induction task: Welch t-test and Spearman.
2. IOI: heads flagged by head-level activation patching on clean/corrupt IOI pairs, against CHG
   facilitation on IOI: Welch t-test and Spearman.
3. SVA and IOI: targeted ablation curves from G+, and sufficiency / necessity of the facilitating heads
   against random head sets of the same size.

Sized for a CPU (about 10-15 minutes on two cores). Writes ``results.json``, ``report.md``,
``ablation_curves.csv`` and ``ablation_<task>.png`` into OUT_DIR and prints the report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from chg_tlens import CHGConfig, CHGResult, GateData, fit_chg
from chg_tlens.analysis.validate import (
    ablation_curve,
    mediation_test,
    necessity,
    patching_scores,
    sufficiency,
)
from chg_tlens.app.plot import ablation_curves, figure_png
from chg_tlens.models.load import load_model
from chg_tlens.tasks import make_task

INDUCTION_SEQ_LEN = 8
DETECTOR_THRESHOLD = 0.4
"""A head is an induction head when at least this share of its attention (BOS excluded) falls on the
token after the previous occurrence of the current token (TransformerLens' "mul" score)."""
PATCHING_TOP_K = 10
ABLATION_MAX_HEADS = 20


def main() -> None:
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    clock = time.time()
    model = load_model("smollm2-135m", device="cpu")
    timings["load_model"] = time.time() - clock
    config = CHGConfig(n_seeds=args.n_seeds, steps=args.steps, batch_size=args.batch_size, progress=False)
    results: dict[str, Any] = {"settings": vars(args) | {"chg_config": config.__dict__ | {}}}

    fits: dict[str, CHGResult] = {}
    for task in ("induction", "ioi", "sva"):
        options = {"seq_len": INDUCTION_SEQ_LEN} if task == "induction" else {}
        clock = time.time()
        fits[task] = fit_chg(model, make_task(task, model, n=args.n, seed=0, **options), config)
        timings[f"fit_{task}"] = time.time() - clock
        results[f"roles_{task}"] = fits[task].summary().round(4).reset_index().to_dict(orient="records")

    clock = time.time()
    detector = induction_detector_scores(model, args.n_detect)
    timings["induction_detector"] = time.time() - clock
    flagged = detector >= DETECTOR_THRESHOLD
    results["induction"] = {
        "detector": "transformer_lens.head_detector.detect_head('induction_head', exclude_bos=True)",
        "threshold": DETECTOR_THRESHOLD,
        "flagged_heads": heads_of(flagged),
        "test": mediation_test(fits["induction"], flagged) if flagged.sum() >= 2 else None,
        "spearman": mediation_test(fits["induction"], detector),
    }

    clock = time.time()
    ioi_pairs = make_task("ioi", model, n=args.n_patch, seed=2)
    patching = patching_scores(model, ioi_pairs)
    timings["ioi_patching"] = time.time() - clock
    results["ioi"] = {
        "patching": "transformer_lens.patching.get_act_patch_attn_head_out_all_pos, normalised "
                    "target log-prob recovery, corrupt='swap_subject'",
        "top_k": PATCHING_TOP_K,
        "flagged_heads": heads_of_top(patching, PATCHING_TOP_K),
        "patching_scores_top": [round(float(v), 4) for v in patching.flatten().sort(descending=True)
                                .values[:PATCHING_TOP_K]],
        "test": mediation_test(fits["ioi"], patching, top_k=PATCHING_TOP_K),
        "test_abs": mediation_test(fits["ioi"], patching.abs(), top_k=PATCHING_TOP_K),
    }

    curves = []
    for task in ("sva", "ioi"):
        clock = time.time()
        held_out = make_task(task, model, n=args.n_eval, seed=1)
        frame = ablation_curve(model, held_out, fits[task], "facilitating", values=(0.0,),
                               max_heads=ABLATION_MAX_HEADS)
        frame = pd.concat([
            frame,
            ablation_curve(model, held_out, fits[task], "irrelevant", values=(0.0,),
                           max_heads=ABLATION_MAX_HEADS),
            ablation_curve(model, held_out, fits[task], "interfering", values=(1.0,),
                           max_heads=ABLATION_MAX_HEADS),
        ], ignore_index=True).assign(task=task)
        curves.append(frame)
        kept = sufficiency(model, held_out, fits[task], n_random=args.n_random)
        removed = necessity(model, held_out, fits[task], n_random=args.n_random)
        results[f"circuit_{task}"] = {
            "facilitating_heads_seed0": fits[task].roles(seed=0)["facilitating"],
            "sufficiency": summarise_circuit_test(kept),
            "necessity": summarise_circuit_test(removed),
        }
        results[f"ablation_{task}"] = ablation_summary(frame)
        save_plot(frame, out / f"ablation_{task}.png", task)
        timings[f"validate_{task}"] = time.time() - clock

    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    pd.concat(curves, ignore_index=True).to_csv(out / "ablation_curves.csv", index=False)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = markdown_report(results)
    (out / "report.md").write_text(report)
    print(report)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder for results.json, report.md and the plots")
    parser.add_argument("--n", type=int, default=32, help="examples per task for the CHG fits")
    parser.add_argument("--n-eval", type=int, default=16, help="held-out examples for the ablations")
    parser.add_argument("--n-patch", type=int, default=8, help="IOI pairs for activation patching")
    parser.add_argument("--n-detect", type=int, default=8, help="repeated sequences for the detector")
    parser.add_argument("--n-random", type=int, default=5, help="random head sets per circuit test")
    parser.add_argument("--steps", type=int, default=40, help="Adam updates per CHG stage")
    parser.add_argument("--n-seeds", type=int, default=3, help="CHG seeds")
    parser.add_argument("--batch-size", type=int, default=8, help="CHG batch size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args()


def induction_detector_scores(model: Any, n_sequences: int) -> torch.Tensor:
    """TransformerLens' induction-head score per head, averaged over repeated random-token texts.

    The detector takes text; a random token sequence decoded and written twice is re-tokenized by the
    detector itself, and its detection pattern comes from those same tokens, so it stays consistent.
    """
    from transformer_lens.head_detector import detect_head

    sequences: GateData = make_task("induction", model, n=n_sequences, seed=3, seq_len=INDUCTION_SEQ_LEN)
    first_halves = sequences.tokens[:, 1 : 1 + INDUCTION_SEQ_LEN]
    texts = [model.tokenizer.decode(first_halves[i]) for i in range(n_sequences)]
    with torch.no_grad():
        return detect_head(model, [text + text for text in texts], "induction_head", exclude_bos=True).float()


def heads_of(flags: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in torch.nonzero(flags)]


def heads_of_top(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    order = torch.sort(-scores.flatten(), stable=True).indices[:k]
    return [divmod(int(i), scores.shape[1]) for i in order]


def summarise_circuit_test(frame: pd.DataFrame) -> dict[str, Any]:
    by = frame.groupby("condition")
    return {
        condition: {"logprob": round(float(group.logprob.mean()), 4),
                    "accuracy": round(float(group.accuracy.mean()), 4),
                    "n_heads": int(group.n_heads.iloc[0]), "draws": len(group)}
        for condition, group in by
    }


def ablation_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Change in mean target log-prob after 1, 5, 10 and 20 heads, per curve."""
    summary = {}
    for (score, value), group in frame.groupby(["score", "value"], sort=False):
        at = group.set_index("n_changed").delta_logprob
        summary[f"{score} -> {value:g}"] = {str(k): round(float(at[k]), 4) for k in (1, 5, 10, 20) if k in at}
    return summary


def save_plot(frame: pd.DataFrame, path: Path, task: str) -> None:
    figure = ablation_curves(frame, title=f"SmolLM2-135M, {task}: targeted ablation from G+ (seed 0)")
    path.write_bytes(figure_png(figure, dpi=120))


def markdown_report(results: dict[str, Any]) -> str:
    lines = ["# CHG validation study: SmolLM2-135M-Instruct (30 layers x 9 heads)", ""]
    s = results["settings"]
    lines += [f"CHG: {s['n_seeds']} seeds, {s['steps']} steps per stage, batch {s['batch_size']}, "
              f"{s['n']} examples per task; ablations on {s['n_eval']} held-out examples.", ""]
    lines += ["## Mediation methods vs CHG facilitation (max over seeds)", "",
              "| comparison | flagged | facilitation flagged | facilitation rest | Welch t | p | "
              "Spearman rho | p |", "|---|---|---|---|---|---|---|---|"]
    ind = results["induction"]
    top_k = results["ioi"]["top_k"]
    rows = [(f"induction detector (score >= {ind['threshold']:.1f}) vs CHG induction", ind["test"],
             ind["spearman"]),
            (f"IOI activation patching (top {top_k}) vs CHG ioi", results["ioi"]["test"],
             results["ioi"]["test"]),
            (f"IOI activation patching, abs score (top {top_k})", results["ioi"]["test_abs"],
             results["ioi"]["test_abs"])]
    for name, test, corr in rows:
        if test is None:
            lines.append(f"| {name} | fewer than 2 | - | - | - | - | {fmt(corr['spearman_rho'])} | "
                         f"{fmt(corr['spearman_p'])} |")
            continue
        lines.append(f"| {name} | {test['n_flagged']} | {fmt(test['facilitation_flagged'])} | "
                     f"{fmt(test['facilitation_rest'])} | {fmt(test['t'])} | {fmt(test['p'])} | "
                     f"{fmt(corr['spearman_rho'])} | {fmt(corr['spearman_p'])} |")
    lines += ["", "## Sufficiency and necessity of the facilitating heads (seed 0)", "",
              "| task | test | heads | circuit log-prob | random log-prob | full model | no heads | "
              "circuit acc | random acc | full acc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in ("sva", "ioi"):
        for test in ("sufficiency", "necessity"):
            r = results[f"circuit_{task}"][test]
            lines.append(
                f"| {task} | {test} | {r['circuit']['n_heads']} | {fmt(r['circuit']['logprob'])} | "
                f"{fmt(r['random']['logprob'])} | {fmt(r['full model']['logprob'])} | "
                f"{fmt(r['no heads']['logprob'])} | {fmt(r['circuit']['accuracy'])} | "
                f"{fmt(r['random']['accuracy'])} | {fmt(r['full model']['accuracy'])} |")
    lines += ["", "## Targeted ablation from G+: change in mean target log-prob after k heads", "",
              "| task | curve | k=1 | k=5 | k=10 | k=20 |", "|---|---|---|---|---|---|"]
    for task in ("sva", "ioi"):
        for curve, at in results[f"ablation_{task}"].items():
            lines.append(f"| {task} | {curve} | " + " | ".join(fmt(at.get(k)) for k in ("1", "5", "10", "20"))
                         + " |")
    lines += ["", "## Role shares per seed", ""]
    for task in ("induction", "ioi", "sva"):
        lines.append(f"- {task}: " + "; ".join(
            f"seed {r['seed']}: fac {r['facilitating']:.2f} / int {r['interfering']:.2f} / "
            f"irr {r['irrelevant']:.2f}" for r in results[f"roles_{task}"]))
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()), ""]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) < 1e-3 and value != 0):
        return f"{value:.2e}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
