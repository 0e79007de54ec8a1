"""Which optimiser earns the convergence certificate on SmolLM2-135M, at what cost, and do two certified
fits by different optimisers agree?

    python benchmarks/optimiser_study.py OUT                       # sva, ioi, induction; resumable
    python benchmarks/optimiser_study.py OUT --tasks sva --budget-minutes 60 --docs

Per task, every variant starts from the same initial gates (same seeds) on the same prompts:

    paper      Adam, minibatch, the paper's learning rates (``--adam-steps`` updates per stage)
    adam_full  Adam on the whole data each update (batch = all prompts), 5x / 2x the paper's rates
    lbfgs      full-data L-BFGS per mask, stopping once certified (``--lbfgs-steps`` ceiling)
    lbfgs_m10  the same with 10 curvature pairs instead of ``--lbfgs-memory``: another path from the same
               start (a different quasi-Newton model of the curvature), to test that certified roles
               do not depend on the path
    lbfgs_m10_shared_zero
               ``lbfgs_m10`` started from ``lbfgs``'s stage-zero gates (run after it): the two then share
               stage zero, so what still differs between them arises in G+ and G-
    lbfgs_3x   ``lbfgs`` without early stopping, every stage run for 3x the iterations of ``lbfgs``'s
               longest stage (run after it): the same configuration with 3x the budget. Without early
               stopping no mask stops moving (unless no step can lower its objective), so this shows
               whether optimising on past the certificate changes roles
    lbfgs_tight, lbfgs_tighter
               ``lbfgs`` certified at a 10x / 100x tighter ``grad_tolerance`` (0.01 / 0.001), ceiling
               3x ``lbfgs``'s longest stage: does a stricter certificate keep the roles?
    lbfgs_contrast
               ``lbfgs`` on the clean-vs-corrupt contrast (``objective="contrast"``; tasks with corrupt
               twins) instead of next-token NLL: another objective, so it is not paired with the others

For each fit: example forward+backward passes and seconds (as the fit measured them), the stage x seed
rows that carry the certificate, the largest stationarity residual, and the role shares. Between every
pair of variants of one task: the share of (seed, head) with the same role, overall and on the seeds
where both fits are certified in every stage. That agreement, between certified fits from the same
initial gates by different optimisers, is what says the roles belong to the data rather than to the
schedule. Where they disagree, the pair table says where it starts: per stage, the share of gates on the
same side of 0.5 and each fit's final objective (a lower objective from the same start = a better
stationary point, i.e. the other fit stopped in another basin, not short of its own). Fits are saved
under OUT/fits/<task>/<variant>/ as they finish (an interrupted fit resumes from its checkpoint), so a
killed or budget-limited run continues when called again. Tables go to OUT/optimiser_study.{md,json} and,
with --docs, to docs/results/optimiser_study/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from convergence_study import TASK_OPTIONS, resumable_fit, seed_agreement  # benchmarks/ is on the path

from chg_tlens import CHGConfig, CHGResult, load_model
from chg_tlens.app.markdown import markdown_table
from chg_tlens.core.convergence import ROLES
from chg_tlens.tasks import make_task


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Name -> CHGConfig settings (batch sizes that say 'all' are filled in per task)."""
    return {
        "paper": dict(optimizer="adam", steps=args.adam_steps, batch_size=args.adam_batch),
        "adam_full": dict(optimizer="adam", steps=args.adam_steps, batch_size="all",
                          lr_zero=(0.5, 0.01), lr_reg=(1.0, 0.02)),
        "lbfgs": dict(optimizer="lbfgs", steps=args.lbfgs_steps, batch_size="all",
                      lbfgs_memory=args.lbfgs_memory),
        "lbfgs_m10": dict(optimizer="lbfgs", steps=args.lbfgs_steps, batch_size="all", lbfgs_memory=10),
        "lbfgs_m10_shared_zero": dict(optimizer="lbfgs", steps=args.lbfgs_steps, batch_size="all",
                                      lbfgs_memory=10, init_from="lbfgs"),
        "lbfgs_3x": dict(optimizer="lbfgs", steps="3x lbfgs", batch_size="all",
                         lbfgs_memory=args.lbfgs_memory, early_stop=False),
        "lbfgs_tight": dict(optimizer="lbfgs", steps="3x lbfgs", batch_size="all",
                            lbfgs_memory=args.lbfgs_memory, grad_tolerance=0.01),
        "lbfgs_tighter": dict(optimizer="lbfgs", steps="3x lbfgs", batch_size="all",
                              lbfgs_memory=args.lbfgs_memory, grad_tolerance=0.001),
        "lbfgs_contrast": dict(optimizer="lbfgs", steps=args.lbfgs_steps, batch_size="all",
                               lbfgs_memory=args.lbfgs_memory, objective="contrast"),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.time()
    model = load_model("smollm2-135m")
    settings = variants(args)
    chosen = [name for name in settings if args.variants is None or name in args.variants]
    for task in args.tasks:
        data = make_task(task, model, n=args.n, seed=0, **TASK_OPTIONS.get(task, {}))
        for name in chosen:
            folder = out / "fits" / task / name
            if not (folder / "record.json").is_file() and (time.time() - started) / 60 > args.budget_minutes:
                print(f"[budget] {task} / {name}: not run ({args.budget_minutes} min spent)", flush=True)
                continue
            record = run_fit(model, data, folder, settings[name], args)
            print(f"{task} / {name}: {record['seconds']:.0f} s, {record['example_passes']} passes, "
                  f"certified {record['certified_rows']}/{record['rows']}", flush=True)
    rows, pairs = summarise(out, settings)
    for folder in [out] + ([Path(args.docs_dir)] if args.docs else []):
        write_tables(folder, rows, pairs, args)


def run_fit(model: Any, data: Any, folder: Path, setting: dict[str, Any], args: argparse.Namespace
            ) -> dict[str, Any]:
    """Fit (or resume, or read back) one variant; returns its record."""
    record_file = folder / "record.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    setting = dict(setting)
    if setting.get("batch_size") == "all":
        setting["batch_size"] = len(data)
    if setting.get("steps") == "3x lbfgs":  # 3x the longest stage of the certified fit
        setting["steps"] = 3 * max(_record(folder.parent / "lbfgs", folder.name)["updates"].values())
    init_theta = None
    if "init_from" in setting:  # start from another variant's stage-zero gates (that fit must exist)
        _record(folder.parent / setting["init_from"], folder.name)
        init_theta = CHGResult.load(folder.parent / setting["init_from"] / "result").theta_zero
    config = CHGConfig(n_seeds=args.seeds, progress=False, checkpoint_every=25,
                       micro_batch_size=args.micro_batch,
                       **{k: v for k, v in setting.items() if k != "init_from"})
    result = resumable_fit(model, data, folder, config, init_theta=init_theta)
    report = result.convergence()
    record = {
        "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
        "updates": {stage: int(curves["loss"].shape[0]) for stage, curves in result.losses.items()},
        "example_passes": result.example_passes(),
        "seconds": float(result.provenance.get("seconds", 0.0)),
        "rows": len(report), "certified_rows": int(report["certified"].sum()),
        "certified_seeds": [int(s) for s, ok in report.groupby("seed")["certified"].all().items() if ok],
        "largest_residual": float(report["gradient"].max()),
        "failed": sorted(set(", ".join(report["failed"]).replace(" ", "").split(",")) - {""}),
    }
    record_file.write_text(json.dumps(record, indent=2))
    return record


def _record(source: Path, needed_by: str) -> dict[str, Any]:
    """The record of a finished fit another variant builds on, or a clear stop naming the one to run first."""
    if not (source / "record.json").is_file():
        raise SystemExit(f"{needed_by} builds on the {source.name} fit: run that variant first "
                         f"(nothing finished in {source}).")
    return json.loads((source / "record.json").read_text())


def summarise(out: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A row per task x variant, and a row per task x pair of variants (role agreement)."""
    rows, pairs = [], []
    for task_folder in sorted(p for p in (out / "fits").glob("*") if p.is_dir()):
        results, records = {}, {}
        for name in settings:
            if (task_folder / name / "record.json").is_file():
                records[name] = json.loads((task_folder / name / "record.json").read_text())
                results[name] = CHGResult.load(task_folder / name / "result")
        for name, record in records.items():
            labels = results[name].role_labels()
            rows.append({"task": task_folder.name, "variant": name,
                         "example_passes": record["example_passes"], "seconds": round(record["seconds"]),
                         "updates": record["updates"],
                         "certified": f"{record['certified_rows']}/{record['rows']}",
                         "largest_residual": record["largest_residual"],
                         "seed_agreement": seed_agreement(labels)}
                        | {role: float((labels == role).mean()) for role in ROLES})
        for a, b in itertools.combinations(records, 2):
            if _objective(records[a]) != _objective(records[b]):  # roles of different objectives differ
                continue
            same = results[a].role_labels() == results[b].role_labels()
            both = sorted(set(records[a]["certified_seeds"]) & set(records[b]["certified_seeds"]))
            pairs.append({"task": task_folder.name, "a": a, "b": b, "same_role": float(same.mean()),
                          "certified_seeds_in_both": both,
                          "same_role_where_both_certified": float(same[both].mean()) if both else None}
                         | stage_differences(results[a], results[b]))
    return rows, pairs


def _objective(record: dict[str, Any]) -> str:
    return str(record["setting"].get("objective", "nll"))


STAGE_GATES = {"zero": "g_zero", "plus": "g_plus", "minus": "g_minus"}


def stage_differences(a: CHGResult, b: CHGResult) -> dict[str, float]:
    """Per stage: the share of gates on the same side of 0.5 in both fits, and each fit's final objective
    (mean over seeds), so a disagreement in roles can be traced to the stage where it starts."""
    out: dict[str, float] = {}
    for stage, gates in STAGE_GATES.items():
        out[f"same_side_{stage}"] = float(((getattr(a, gates) > 0.5) == (getattr(b, gates) > 0.5))
                                          .float().mean())
    for stage in STAGE_GATES:
        out[f"objective_{stage}_a"] = float(a.losses[stage]["loss"][-1].mean())
        out[f"objective_{stage}_b"] = float(b.losses[stage]["loss"][-1].mean())
    return out


def write_tables(folder: Path, rows: list[dict[str, Any]], pairs: list[dict[str, Any]],
                 args: argparse.Namespace) -> None:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "docs", "docs_dir", "command")}
    (folder / "optimiser_study.json").write_text(json.dumps(
        {"settings": settings, "variants": variants(args), "fits": rows, "agreement": pairs},
        indent=2, default=str))
    text = ["# Which optimiser earns the certificate? SmolLM2-135M-Instruct", "",
            f"Written by the command below ({args.n} prompts per task, "
            f"{args.seeds} seeds, {args.threads} CPU threads; every fit of a task from the same initial "
            "gates). Variants: `paper` = Adam, batch "
            f"{args.adam_batch}, the paper's rates, {args.adam_steps} updates per stage; `adam_full` = Adam "
            "on all prompts every update, rates (0.5, 0.01) / (1.0, 0.02); `lbfgs` = full-data L-BFGS per "
            f"mask in the box [-c, c], memory {args.lbfgs_memory}, stopping once certified (ceiling "
            f"{args.lbfgs_steps} iterations); `lbfgs_m10` = the same with memory 10; "
            "`lbfgs_m10_shared_zero` = `lbfgs_m10` started from `lbfgs`'s stage-zero gates; `lbfgs_3x` = "
            "`lbfgs` without early stopping, every stage 3x `lbfgs`'s longest; `lbfgs_tight`, "
            "`lbfgs_tighter` = `lbfgs` certified at gradient tolerance 0.01, 0.001 instead of 0.1 "
            "(ceiling 3x `lbfgs`'s longest stage); `lbfgs_contrast` = `lbfgs` on "
            "the clean-vs-corrupt contrast objective (not paired with the NLL fits). "
            "example_passes: example forward+backward passes over all gate sets, line searches and the "
            "certificate's gradient included. certified: stage x seed rows that carry the certificate. "
            "largest_residual: the largest stationarity residual in units of the regulariser's pull "
            "(certified below 0.1). "
            f"Command: `{args.command}`.", "",
            markdown_table(pd.DataFrame(rows)) if rows else "(no fits yet)", "",
            "## Same role, pairs of optimisers from the same initial gates", "",
            "same_side_<stage>: share of gates on the same side of 0.5 in both fits at the end of that "
            "stage; objective_<stage>_a/_b: each fit's final objective there (mean over seeds; lower is "
            "better, the regularised stages' objective includes the gate reward).", "",
            markdown_table(pd.DataFrame(pairs)) if pairs else "(fewer than two fits of a task)", ""]
    (folder / "optimiser_study.md").write_text("\n".join(text))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="study folder (fits are cached here; rerun to continue)")
    parser.add_argument("--tasks", nargs="+", default=["sva", "ioi", "induction"])
    parser.add_argument("--variants", nargs="+", default=None, help="names from variants(); default all")
    parser.add_argument("--n", type=int, default=64, help="prompts per task")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--adam-steps", type=int, default=200)
    parser.add_argument("--adam-batch", type=int, default=16)
    parser.add_argument("--lbfgs-steps", type=int, default=300)
    parser.add_argument("--lbfgs-memory", type=int, default=100, help="curvature pairs L-BFGS keeps")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--budget-minutes", type=float, default=120.0,
                        help="start no new fit after this long (finished fits are kept; rerun to continue)")
    return parse_study_args(parser, "optimiser_study.py", "docs/results/optimiser_study")


def parse_study_args(parser: argparse.ArgumentParser, script: str, docs_dir: str) -> argparse.Namespace:
    """Add the arguments the SmolLM2 studies share (CPU threads, ``--docs`` / ``--docs-dir``) and parse;
    ``args.command`` is the command line that reproduces the run, which every report prints."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", action="store_true", help="also write the tables to --docs-dir")
    parser.add_argument("--docs-dir", default=docs_dir)
    args = parser.parse_args()
    args.command = " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])
    return args


if __name__ == "__main__":
    main()
