"""Convergence study: which CHG budgets reach a long fit's roles on SmolLM2-135M, at what cost.

    python benchmarks/convergence_study.py OUT                       # sva, ioi, induction; resumable
    python benchmarks/convergence_study.py OUT --tasks sva --budget-minutes 60

Per task, one long reference fit (``--ref-steps`` updates per stage, batch ``--ref-batch``, ``--seeds``
seeds, the paper's schedule) and fits at smaller budgets and other settings, every one started from the
same initial gates (same seeds). For each: example passes (updates x batch x masks, summed over stages)
and wall time; per-head role agreement and Spearman of each score with the reference fit of the same
seed; role agreement between seeds; the share of stage x seed rows the fit itself reports converged;
and, on induction, the mediation test (heads with a TransformerLens-style induction score > 0.4 vs the
rest, max facilitation over seeds, Welch t and p) and what zeroing each of those heads does on held-out
prompts, beside the role the reference fit gives it.

Every fit is saved under OUT/fits/<task>/<variant>/ as it finishes (a fit that is interrupted resumes
from its checkpoint), so a killed or budget-limited run continues where it stopped when called again.
Tables go to OUT/convergence_study.{md,json} and, with --docs, to docs/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chg_tlens import CHGConfig, CHGResult, fit_chg, load_model, validate
from chg_tlens.analysis.compare import induction_reference
from chg_tlens.analysis.metrics import spearman
from chg_tlens.app.markdown import markdown_table
from chg_tlens.app.settings import CPU_BUDGET
from chg_tlens.core.checkpoint import CHECKPOINT_FILE
from chg_tlens.tasks import make_task

FAST_LR = dict(lr_zero=(0.5, 0.05), lr_reg=(1.0, 0.2))
"""A faster schedule: 5x the paper's stage-1 rates, 2x its G+/G- rates (the one-sided clamp keeps
gates that stage 1 drives past -4 reachable for G+)."""
TASK_OPTIONS = {"induction": dict(seq_len=8)}
"""Shorter repeats than the task's default, so the study fits on a CPU; 7 predicted tokens each."""
SCORES = ("facilitating", "interfering", "irrelevant")
CONFIDENT = 0.8
"""A (seed, head) counts as confident when ``CHGResult.confidence()`` reaches this: with 3 seeds, every
seed ends with the same role and the role held over at least 80% of the last quarter's snapshots."""


def variants(ref_steps: int, ref_batch: int) -> dict[str, dict[str, Any]]:
    """Name -> CHGConfig settings. Every non-reference fit costs at most about a third of the reference."""
    third = max(1, ref_steps // 3)
    return {
        "reference": dict(steps=ref_steps, batch_size=ref_batch),
        f"cpu budget ({CPU_BUDGET['steps']} x {CPU_BUDGET['batch_size']})":
            dict(steps=CPU_BUDGET["steps"], batch_size=CPU_BUDGET["batch_size"]),
        "paper, 1/3": dict(steps=third, batch_size=ref_batch),
        "fast lr, 1/3": dict(steps=third, batch_size=ref_batch, **FAST_LR),
        "fast lr, 1/6 x batch 2": dict(steps=max(1, ref_steps // 6), batch_size=2 * ref_batch, **FAST_LR),
        "fast lr, early stop": dict(steps=third, batch_size=ref_batch, early_stop=True, patience=30,
                                    **FAST_LR),
        "paper, early stop": dict(steps=ref_steps, batch_size=ref_batch, early_stop=True, patience=50),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.time()
    model = load_model("smollm2-135m")
    settings = variants(args.ref_steps, args.ref_batch)
    chosen = [name for name in settings
              if args.variants is None or name in args.variants or name == "reference"]
    records: dict[str, dict[str, Any]] = {}
    for task in args.tasks:
        data = make_task(task, model, n=args.n, seed=0, **TASK_OPTIONS.get(task, {}))
        records[task] = {}
        for name in chosen:
            folder = out / "fits" / task / _slug(name)
            over_budget = (time.time() - started) / 60 > args.budget_minutes
            if not (folder / "record.json").is_file() and over_budget:
                print(f"[budget] {task} / {name}: not run ({args.budget_minutes} min spent)", flush=True)
                continue
            records[task][name] = run_fit(model, data, folder, settings[name], args.seeds)
            print(f"{task} / {name}: {records[task][name]['seconds']:.0f} s", flush=True)
        if task == "induction":
            heads = induction_reference(model, data)
            (out / "fits" / task / "induction_heads.json").write_text(json.dumps(heads.tolist()))
            reference = out / "fits" / task / _slug("reference") / "result"
            if reference.exists():
                knockouts = induction_knockouts(model, heads == "facilitating", CHGResult.load(reference),
                                                args.n)
                (out / "fits" / task / "induction_knockouts.json").write_text(json.dumps(knockouts, indent=2))
    table = summarise(out, cached_records(out, settings))
    knockouts_file = out / "fits" / "induction" / "induction_knockouts.json"
    knockouts = json.loads(knockouts_file.read_text()) if knockouts_file.is_file() else []
    write_tables(out, table, args, time.time() - started, knockouts)
    if args.docs:
        write_tables(Path("docs/results"), table, args, time.time() - started, knockouts)


def induction_knockouts(model: Any, flagged: np.ndarray, reference: CHGResult, n: int
                        ) -> list[dict[str, Any]]:
    """Each attention-pattern induction head zeroed alone (and all of them), on held-out prompts: does the
    head the pattern flags carry the task, as the mediation test assumes, and does CHG's role say so?"""
    held_out = make_task("induction", model, n=n, seed=1, **TASK_OPTIONS["induction"])
    heads = [tuple(int(i) for i in head) for head in np.argwhere(flagged)]
    sets = [[head] for head in heads] + [heads]
    gates = torch.ones(1 + len(sets), *flagged.shape)
    for row, chosen in enumerate(sets, start=1):
        for layer, head in chosen:
            gates[row, layer, head] = 0.0
    logprob, accuracy = validate.evaluate_gates(model, held_out, gates)
    labels = reference.role_labels()
    rows = []
    for row, chosen in enumerate(sets, start=1):
        record = {"heads": " + ".join(f"{layer}.{head}" for layer, head in chosen),
                  "reference_roles": "", "facilitation_max": None,
                  "delta_logprob": float(logprob[row] - logprob[0]),
                  "accuracy": float(accuracy[row]), "accuracy_full": float(accuracy[0])}
        if len(chosen) == 1:  # roles and facilitation are per head
            (layer, head), = chosen
            record.update(reference_roles="/".join(sorted(set(labels[:, layer, head]))),
                          facilitation_max=float(reference.facilitating[:, layer, head].max()))
        rows.append(record)
    return rows


def run_fit(model: Any, data: Any, folder: Path, setting: dict[str, Any], n_seeds: int) -> dict[str, Any]:
    """Fit (or resume, or read back) one configuration; returns its record."""
    record_file = folder / "record.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    config = CHGConfig(n_seeds=n_seeds, progress=False, checkpoint_every=25, **setting)
    began = time.time()
    result = resumable_fit(model, data, folder, config)
    record = {
        "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
        "updates": {stage: int(curves["loss"].shape[0]) for stage, curves in result.losses.items()},
        "example_passes": result.example_passes(),
        "seconds": float(result.provenance.get("seconds", time.time() - began)),
        "converged_share": float(result.convergence()["certified"].mean()),
    }
    record_file.write_text(json.dumps(record, indent=2))
    return record


def resumable_fit(model: Any, data: Any, folder: Path, config: CHGConfig,
                  init_theta: torch.Tensor | None = None) -> CHGResult:
    """Fit into ``folder/result``, checkpointing under ``folder/checkpoint`` and resuming from it when a
    killed run left one there; once the result is saved the checkpoint goes (the result holds it all).
    ``init_theta``: initial gate logits instead of the seeds' uniform draw."""
    checkpoint = folder / "checkpoint"
    resume = (checkpoint / CHECKPOINT_FILE).is_file()
    checkpoint.mkdir(parents=True, exist_ok=True)
    result = fit_chg(model, data, config, init_theta=init_theta, run_dir=checkpoint, resume=resume)
    result.save(folder / "result")
    shutil.rmtree(checkpoint)
    return result


def cached_records(out: Path, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every finished fit under OUT, whichever call ran it, so the tables always cover all tasks so far."""
    records: dict[str, dict[str, Any]] = {}
    for task_folder in sorted(p for p in (out / "fits").glob("*") if p.is_dir()):
        fits = {name: json.loads((task_folder / _slug(name) / "record.json").read_text())
                for name in settings if (task_folder / _slug(name) / "record.json").is_file()}
        heads = task_folder / "induction_heads.json"
        if heads.is_file():
            fits["_induction_heads"] = json.loads(heads.read_text())
        records[task_folder.name] = fits
    return records


def summarise(out: Path, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task x variant: cost, agreement with the reference, seed agreement, mediation."""
    rows = []
    for task, fits in records.items():
        if "reference" not in fits:
            continue
        reference = CHGResult.load(out / "fits" / task / _slug("reference") / "result")
        ref_labels = reference.role_labels()
        ref_confident = reference.confidence().numpy() >= CONFIDENT
        ref_passes = fits["reference"]["example_passes"]
        flagged = fits.get("_induction_heads")
        for name, record in fits.items():
            if name.startswith("_"):
                continue
            result = CHGResult.load(out / "fits" / task / _slug(name) / "result")
            labels = result.role_labels()
            confident = result.confidence().numpy() >= CONFIDENT
            same = labels == ref_labels
            row = {
                "task": task, "variant": name, "example_passes": record["example_passes"],
                "passes_vs_reference": record["example_passes"] / ref_passes, "seconds": record["seconds"],
                "role_agreement": float((labels == ref_labels).mean()),
                "role_agreement_min_seed": float((labels == ref_labels).reshape(result.n_seeds, -1)
                                                 .mean(axis=1).min()),
                "seed_agreement": seed_agreement(labels),
                "reference_confident_share": float(ref_confident.mean()),
                "agreement_on_reference_confident": _share(same, ref_confident),
                "confident_share": float(confident.mean()),
                "agreement_where_confident": _share(same, confident),
                "converged_share": record["converged_share"],
            }
            for score in SCORES:
                row[f"spearman_{score}"] = float(np.mean([
                    spearman(getattr(result, score)[s], getattr(reference, score)[s])
                    for s in range(result.n_seeds)]))
            if flagged is not None:
                heads = torch.as_tensor(np.asarray(flagged) == "facilitating")
                test = validate.mediation_test(result, heads)
                row.update(induction_t=test["t"], induction_p=test["p"], induction_heads=int(heads.sum()))
            rows.append(row)
    return rows


def _share(values: np.ndarray, where: np.ndarray) -> float:
    """Mean of ``values`` over the entries ``where`` marks; NaN when it marks none."""
    return float(values[where].mean()) if where.any() else float("nan")


def seed_agreement(labels: np.ndarray) -> float:
    """Mean over pairs of seeds of the share of heads given the same role."""
    pairs = [(a, b) for a in range(len(labels)) for b in range(a + 1, len(labels))]
    return float(np.mean([(labels[a] == labels[b]).mean() for a, b in pairs])) if pairs else float("nan")


def write_tables(folder: Path, rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float,
                 knockouts: list[dict[str, Any]]) -> None:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    settings = {"ref_steps": args.ref_steps, "ref_batch": args.ref_batch, "seeds": args.seeds, "n": args.n,
                "threads": args.threads, "tasks": args.tasks,
                "variants": variants(args.ref_steps, args.ref_batch)}
    (folder / "convergence_study.json").write_text(json.dumps(
        {"settings": settings, "rows": rows, "induction_knockouts": knockouts,
         "seconds_this_call": round(seconds, 1)}, indent=2, default=str))
    frame = pd.DataFrame(rows)
    columns = ["task", "variant", "passes_vs_reference", "seconds", "role_agreement",
               "role_agreement_min_seed", "spearman_facilitating", "spearman_interfering",
               "spearman_irrelevant", "seed_agreement", "converged_share", "reference_confident_share",
               "agreement_on_reference_confident", "confident_share", "agreement_where_confident",
               "induction_t", "induction_p"]
    body = markdown_table(frame[[c for c in columns if c in frame]]) if len(frame) else "(no fits yet)"
    text = ["# CHG convergence study, SmolLM2-135M-Instruct", "",
            f"Reference per task: {args.ref_steps} updates per stage, batch {args.ref_batch}, "
            f"{args.seeds} seeds, the paper's learning rates; {args.n} prompts; every fit from the same "
            "initial gates. "
            "role_agreement: share of (seed, head) with the reference's role; spearman_*: of each score with "
            "the reference's, same seed, mean over seeds; seed_agreement: between seeds of the same fit; "
            "converged_share: stage x seed rows the fit reports converged. "
            f"reference_confident_share: (seed, head) whose reference confidence is >= {CONFIDENT}; "
            "agreement_on_reference_confident: role agreement on those; confident_share and "
            "agreement_where_confident: the same for the fit's own confidence (what "
            f"`roles(min_confidence={CONFIDENT})` would report, and how often the reference agrees).",
            "", body, ""]
    if knockouts:
        text += ["## The attention-pattern induction heads, zeroed", "",
                 "Heads with a TransformerLens-style induction score > 0.4 (the mediation test's flagged "
                 "set), each zeroed alone and all together in the full model, on held-out prompts (seed 1): "
                 "change of the mean target log-prob and the accuracy, beside the reference fit's role(s) "
                 "over its seeds and its max facilitation.", "", markdown_table(pd.DataFrame(knockouts)), ""]
    (folder / "convergence_study.md").write_text("\n".join(text))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="study folder (fits are cached here; rerun to continue)")
    parser.add_argument("--tasks", nargs="+", default=["sva", "ioi", "induction"])
    parser.add_argument("--variants", nargs="+", default=None, help="names from variants(); default all")
    parser.add_argument("--ref-steps", type=int, default=400)
    parser.add_argument("--ref-batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=64, help="prompts per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-minutes", type=float, default=120.0,
                        help="start no new fit after this long (finished fits are kept; rerun to continue)")
    parser.add_argument("--docs", action="store_true", help="also write docs/results/convergence_study.*")
    return parser.parse_args()


if __name__ == "__main__":
    main()
