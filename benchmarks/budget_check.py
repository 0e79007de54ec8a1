"""Does optimising on past the certificate change the roles? Issue 24's 3x-budget check of a certified fit.

    python benchmarks/budget_check.py runs/demo runs/budget_check --docs      # resumable

Reads a run folder (``chg-tlens demo`` or ``fit`` on a task) whose G+ and G- are certified, rebuilds its
model and prompts (checked against the result's data fingerprint), and continues G+ and G- of every seed
from their certified gates by the same optimiser with early stopping off, until each has run 3x the
updates of the longest regularised stage in all (the certified updates plus twice as many again). So no
mask stops on its own: the continued gates show whether the certified point holds, or whether more budget
walks the roles elsewhere. The curvature memory of L-BFGS restarts at the certified point (its first step
is steepest descent), which makes the check stricter, not looser. Stage zero is not continued: its gates
are only G+ and G-'s starting point, and a stage-zero certified at the objective's lower bound is one of
many exact fits (the initial gates' error bar, not the optimiser's).

Per seed: the share of heads with the same role, the share of G+ and G- gates on the same side of 0.5,
each stage's objective at the certificate and after the extra budget, and whether the continued stage is
itself certified. Each continued stage checkpoints under OUT/<stage>/ (every 25 updates) and resumes when
called again; ``--stages`` runs some of them (e.g. one per process), and ``--report-only`` writes the
tables from whatever has run so far, a stage still under way read at its last checkpoint and marked
partial (a gate set crawling at its certified point costs up to 9 line-search passes per update).
Tables go to OUT/budget_check.{md,json} and, with --docs, to docs/results/budget_check/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from optimiser_study import parse_study_args  # benchmarks/ is on the path

from chg_tlens import CHGConfig, CHGResult, load_model
from chg_tlens.app.markdown import markdown_table
from chg_tlens.core import fit as fitting
from chg_tlens.core.checkpoint import CHECKPOINT_FILE
from chg_tlens.core.convergence import ROLES, role_codes, stage_report
from chg_tlens.tasks import make_task

STAGE_SIGN = {"plus": 1.0, "minus": -1.0}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    run = json.loads((Path(args.run_dir) / "run.json").read_text())
    result = CHGResult.load(args.run_dir)
    certified = result.convergence()
    regularised = certified[certified["stage"].isin(list(STAGE_SIGN))]
    if not regularised["certified"].all():
        raise SystemExit(f"{args.run_dir}: G+ and G- are not certified in every seed; nothing to check")
    ceiling = args.factor * int(regularised["updates"].max())
    if not args.report_only:
        model = load_model(run["model"])
        data = make_task(run["task"], model, n=int(result.provenance["n_examples"]),
                         seed=int(result.config.get("seed", 0)))
        if data.fingerprint() != result.provenance.get("data_fingerprint"):
            raise SystemExit(f"rebuilt {run['task']} prompts differ from those {args.run_dir} was fitted on")
        for stage in args.stages:
            continue_stage(model, data, result, stage, ceiling, out / stage)
    continued = {stage: so_far(result, out / stage, stage) for stage in STAGE_SIGN}
    rows = compare(result, continued, ceiling)
    write_tables([out] + ([Path(args.docs_dir)] if args.docs else []), rows, args, ceiling)


def continue_stage(model: Any, data: Any, result: CHGResult, stage: str, ceiling: int, folder: Path) -> None:
    """Run ``stage`` on from its certified gates with early stopping off, up to ``ceiling`` updates in all
    (counting the stage's logged ones); saves its gates, trace and losses in ``folder`` (:func:`so_far`
    reads them)."""
    saved = folder / "continued.pt"
    if saved.is_file():
        return
    done = int(result.losses[stage]["loss"].shape[0])
    keep = ("optimizer", "lam", "clamp", "clamp_mode", "lbfgs_memory", "grad_tolerance", "stop_tolerance",
            "patience", "trace_every", "lr_reg", "micro_batch_size", "seed", "role_threshold")
    settings = {key: result.config[key] for key in keep if key in result.config}
    if "lr_reg" in settings:  # JSON keeps tuples as lists
        settings["lr_reg"] = tuple(settings["lr_reg"])
    config = CHGConfig(**settings, n_seeds=result.n_seeds, batch_size=len(data), steps=ceiling - done,
                       early_stop=False, progress=False, checkpoint_every=25).validate()
    lam = STAGE_SIGN[stage] * config.lam
    theta = getattr(result, f"theta_{stage}")
    checkpoint = folder / "checkpoint"
    resume = (checkpoint / CHECKPOINT_FILE).is_file()
    checkpoint.mkdir(parents=True, exist_ok=True)
    run = fitting.run_stages(model, data, config, [fitting.Stage(stage, "init", config.lr_reg,
                                                                 fitting.nll_objective, lams=(lam,))],
                             "chg", theta, checkpoint, resume)
    torch.save({"theta": run.theta[stage], "trace": run.trace[stage], "losses": run.losses[stage]}, saved)
    shutil.rmtree(checkpoint)


def so_far(result: CHGResult, folder: Path, stage: str) -> dict[str, Any]:
    """A continued stage as far as it has run: finished (its saved record), under way (its last
    checkpoint, ``partial``), or not started (the certified gates, no updates)."""
    if (folder / "continued.pt").is_file():
        record = torch.load(folder / "continued.pt")  # tensors only
        return record | {"partial": False, "ran": int(record["losses"]["loss"].shape[0])}
    checkpoint = folder / "checkpoint" / CHECKPOINT_FILE
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)  # our own checkpoint: the fit's state dict
        if state.get("theta") is not None:
            losses = {key: torch.stack(value) for key, value in state["logs"][stage].items()}
            return {"theta": state["theta"], "trace": None, "losses": losses, "partial": True,
                    "ran": int(state["step"])}
    return {"theta": getattr(result, f"theta_{stage}"), "trace": None, "losses": None, "partial": True,
            "ran": 0}


def certified_at(result: CHGResult, stage: str, seed: int) -> int:
    """The update where the certified fit stopped moving this seed's gate set (its last logged one if it
    moved to the stage's end, or the result predates ``settled_at``)."""
    settled = int(result.trace[stage]["settled_at"][seed]) if "settled_at" in result.trace[stage] else -1
    return settled if settled >= 0 else int(result.losses[stage]["loss"].shape[0])


def compare(result: CHGResult, continued: dict[str, dict[str, Any]], ceiling: int) -> list[dict[str, Any]]:
    """A row per seed: same role, same side of 0.5 per stage, objectives before and after, and the
    continued stages' own certificate."""
    threshold = float(result.config.get("role_threshold", 0.5))
    before = role_codes(result.g_plus, result.g_minus, threshold)
    g_after = {stage: torch.sigmoid(record["theta"]) for stage, record in continued.items()}
    after = role_codes(g_after["plus"], g_after["minus"], threshold)
    # each continued stage's own certificate, its undecided-gates test read against the fit's initial draw
    own = {stage: [row for row in stage_report({"zero": result.trace["zero"], stage: record["trace"]},
                                               {"zero": result.losses["zero"], stage: record["losses"]},
                                               {**result.config, "fuse_regularised": False})
                   if row["stage"] == stage] for stage, record in continued.items() if not record["partial"]}
    rows = []
    for seed in range(result.n_seeds):
        row: dict[str, Any] = {"seed": seed, "updates_in_all": ceiling,
                               "same_role": float((before[seed] == after[seed]).float().mean())}
        for stage, record in continued.items():
            gates = getattr(result, f"g_{stage}")[seed]
            row[f"same_side_{stage}"] = float(((gates > 0.5) == (g_after[stage][seed] > 0.5)).float().mean())
            row[f"largest_gate_change_{stage}"] = f"{float((gates - g_after[stage][seed]).abs().max()):.2g}"
            stuck = (record["trace"] is not None and int(record["trace"]["settled_at"][seed]) >= 0)
            row[f"updates_{stage}"] = f"{certified_at(result, stage, seed)} + {record['ran']}" + (
                " (partial)" if record["partial"] else " (no step lowers the objective)" if stuck else "")
            row[f"objective_{stage}_certified"] = float(result.losses[stage]["loss"][-1, seed])
            row[f"objective_{stage}_after"] = (float(record["losses"]["loss"][-1, seed])
                                               if record["losses"] is not None else None)
            row[f"continued_{stage}_certified"] = (bool(own[stage][seed]["certified"]) if stage in own
                                                   else None)
        for name, codes in (("before", before), ("after", after)):
            for index, role in enumerate(ROLES):
                row[f"{role}_{name}"] = float((codes[seed] == index).float().mean())
        rows.append(row)
    return rows


def write_tables(folders: list[Path], rows: list[dict[str, Any]], args: argparse.Namespace, ceiling: int
                 ) -> None:
    import pandas as pd

    text = ["# Optimising on past the certificate: the 3x-budget check", "",
            f"Written by `{args.command}`. G+ and G- of every seed of `{args.run_dir}` continued from their "
            f"certified gates, early stopping off, to {ceiling} updates in all ({args.factor}x the longest "
            "certified regularised stage; L-BFGS's curvature memory restarts there). same_role: share of "
            "heads whose role (from G+ and G- of the seed) is the same after the extra budget; updates_*: "
            "the update where the stage was certified + updates run on from there (partial: still under "
            "way, read at its last checkpoint, and rerun the command to continue it; no step lowers the "
            "objective: L-BFGS stopped the gate set because even a steepest-descent step found no "
            "decrease, the one stop left with early stopping off); same_side_*: "
            "share of gates on the same side of 0.5; largest_gate_change_*: the largest |change| of a gate; "
            "objective_*: the stage's objective (lower is better) "
            "at the certificate and after; continued_*_certified: the continued stage's own certificate, "
            "read on its trace (its window now covers the extra updates).", "",
            markdown_table(pd.DataFrame(rows)), ""]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "budget_check.json").write_text(json.dumps(
            {"command": args.command, "run_dir": args.run_dir, "ceiling": ceiling, "seeds": rows}, indent=2))
        (folder / "budget_check.md").write_text("\n".join(text))
    print("\n".join(text))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder whose G+ and G- are certified (e.g. runs/demo)")
    parser.add_argument("out", help="where the continued stages are cached (rerun to resume)")
    parser.add_argument("--factor", type=int, default=3, help="updates in all, x the longest certified stage")
    parser.add_argument("--stages", nargs="+", choices=list(STAGE_SIGN), default=list(STAGE_SIGN),
                        help="which continued stages to run in this call (default both)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the tables from what has run so far")
    return parse_study_args(parser, "budget_check.py", "docs/results/budget_check")


if __name__ == "__main__":
    main()
