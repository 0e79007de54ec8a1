"""Every head-scoring method against every reference on SmolLM2-135M: does the reference decide the winner?

    python benchmarks/reference_study.py OUT --chg-fit 'runs/optimiser_study_n8/fits/{task}/lbfgs/result'
    python benchmarks/reference_study.py OUT ... --docs          # resumable; tables to docs/results/

Per task (induction with ``seq_len=8``, ioi), on the prompts the CHG fit saw (``--n``, seed 0), three
references, each encoding one notion of importance (:mod:`chg_tlens.analysis.ground_truths`):

    final_stage   heads that write the answer, picked by attention (+ direct effect on ioi): the
                  reference of ``compare_methods.py`` (induction heads; name movers)
    full_circuit  final_stage plus every earlier head whose path-patching effect through a final-stage
                  head's query, key or value reaches ``--share`` of the total effect (the corrupt
                  twin as counterfactual, or each head's mean with ``--counterfactual mean``)
    necessity     the heads of full_circuit whose zero-ablation costs the task alone or once one other
                  head of it is gone (pairwise joint knockouts: a backup counts)

and every method of ``--methods`` (``compare.run_methods``, published forms; ACDC and subnetwork probing
are left out by default: an hour each here) plus CHG read from a saved fit made on the same prompts
(``--chg-fit``, a folder with ``{task}``; max and mean of G- over seeds) and, with
``--chg-contrast-fit``, CHG fitted on the clean-vs-corrupt contrast (``objective="contrast"``): the
information the twin-based methods get. Per method x reference: ROC AUC
with its 90% bootstrap interval over prompts where the method keeps per-example rows (a CHG fit, HISP with
its per-layer normalisation and random scores have none: a fit's prompt noise needs refits). Everything is
cached under OUT/<task>/ as it finishes; a rerun continues. Tables go to OUT/reference_study.{md,json}
and, with --docs, to docs/results/reference_study/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from chg_tlens import CHGResult, load_model
from chg_tlens.analysis import compare, ground_truths
from chg_tlens.analysis.metrics import truth_metrics
from chg_tlens.app.markdown import markdown_table
from chg_tlens.app.runs import write_json
from chg_tlens.models import adapter
from chg_tlens.tasks import make_task

TASK_OPTIONS: dict[str, dict[str, Any]] = {"induction": {"seq_len": 8}, "ioi": {}}
DEFAULT_METHODS = ("hisp", "hisp_raw", "ablation_zero", "ablation_mean", "activation_patching_denoise",
                   "activation_patching_noise", "attribution_patching", "eap_clean", "eap_ig", "random")
REFERENCES = ("final_stage", "full_circuit", "necessity")
DOCS = Path("docs/results/reference_study")


def references(model: Any, task: str, data: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The three references of one task, cached in OUT/<task>/references.json."""
    cached = out / task / "references.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    started = time.time()
    layout = adapter.require_model(model)
    if task == "induction":
        final = compare.induction_reference(model, data)
        rule = f"attention-pattern induction score > {compare.REAL_INDUCTION_THRESHOLD}"
    else:
        final, rule = compare.ioi_reference(model, data)
        if final is None:
            raise SystemExit(f"ioi: {rule}")
    final_heads = [(int(a), int(b)) for a, b in zip(*np.nonzero(final == "facilitating"), strict=True)]
    upstream = ground_truths.upstream_heads(model, data, final_heads, threshold=args.share,
                                            counterfactual=args.counterfactual)
    print(f"  {task}: full circuit {len(upstream.heads)} heads, {upstream.passes} passes, "
          f"{time.time() - started:.0f} s", flush=True)
    necessity = ground_truths.backup_necessity(model, data, upstream.heads, threshold=args.share,
                                               n_boot=args.n_boot)
    record = {
        "final_stage": {"heads": final_heads, "rule": rule},
        "full_circuit": {"heads": upstream.heads, "total_effect": upstream.total_effect,
                         "counterfactual": upstream.counterfactual,
                         "passes": upstream.passes,
                         "effects": {f"{layer}.{head}": [float(upstream.effects[i, layer, head])
                                                         for i in range(len(upstream.inputs))]
                                     for layer, head in upstream.heads if (layer, head) not in final_heads},
                         "inputs": list(upstream.inputs)},
        "necessity": {"heads": necessity.heads, "total": necessity.total,
                      "per_head": {f"{h[0]}.{h[1]}": {"alone": necessity.alone[h],
                                                      "with_partner": necessity.with_partner[h],
                                                      "partner": necessity.partner[h],
                                                      "necessity": necessity.necessity[h],
                                                      "low": necessity.low[h], "high": necessity.high[h]}
                                   for h in necessity.candidates}},
        "n_heads": layout.n_layers * layout.n_heads, "seconds": round(time.time() - started, 1),
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, cached)
    return json.loads(cached.read_text())


def method_scores(model: Any, task: str, data: Any, args: argparse.Namespace, out: Path
                  ) -> tuple[list[Any], dict[str, CHGResult]]:
    """Each method's scores on the prompts (one cache file per method), then CHG from the saved fits
    (keyed 'nll' and 'contrast' by objective)."""
    scored = []
    for name in args.methods:
        cached = out / task / "scores" / f"{name}.pt"
        if not cached.is_file():
            started = time.time()
            new, skipped = compare.run_methods(model, data, [name], compare.MethodSettings(batch_size=8))
            if skipped:
                raise SystemExit(f"{task}: {name} skipped: {skipped[name]}")
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(new, cached)
            print(f"  {task}: {name} {time.time() - started:.0f} s", flush=True)
        scored.extend(torch.load(cached, weights_only=False))
    fits = {}
    if args.chg_fit:
        fits["nll"] = CHGResult.load(Path(args.chg_fit.format(task=task)))
        scored.extend(compare.fitted_chg_scores([fits["nll"]], data))
    contrast_folder = Path(args.chg_contrast_fit.format(task=task)) if args.chg_contrast_fit else None
    if contrast_folder is not None and not contrast_folder.is_dir():
        print(f"  {task}: no contrast fit at {contrast_folder} (the report says so)", flush=True)
    elif contrast_folder is not None:
        contrast = CHGResult.load(contrast_folder)
        if contrast.config.get("objective") != "contrast":
            raise SystemExit(f"--chg-contrast-fit {args.chg_contrast_fit}: that fit's objective is "
                             f"{contrast.config.get('objective', 'nll')!r}, not 'contrast'.")
        for item in compare.fitted_chg_scores([contrast], data):
            item.method = f"{item.method} [contrast]"
            scored.append(item)
        fits["contrast"] = contrast
    return scored, fits


def table(record: dict[str, Any], scored: list[Any], layout: Any) -> pd.DataFrame:
    rows = []
    for item in scored:
        row: dict[str, Any] = {"method": item.method}
        for name in REFERENCES:
            heads = [tuple(h) for h in record[name]["heads"]]
            roles = ground_truths.reference_roles(heads, layout)
            auc = truth_metrics(item, roles)["auc"] if 0 < len(heads) < roles.size else float("nan")
            interval = compare.auc_interval(item, roles == "facilitating") if 0 < len(heads) else {}
            low, high = interval.get("auc_low"), interval.get("auc_high")
            row[name] = f"{auc:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")
        rows.append(row)
    return pd.DataFrame(rows)


def report(results: dict[str, Any], settings: dict[str, Any]) -> str:
    text = ["# Which reference decides the winner? Every method against three references on SmolLM2-135M", "",
            f"Every number below: `{settings['command']}` ({settings['seconds']:.0f} s on this project's "
            "2-core CPU). Prompts: the ones the CHG fit saw (seed 0). ROC AUC of each method's per-head "
            "scores for the reference's heads (chance 0.5), with a 90% bootstrap interval over prompts "
            "where the method keeps per-example rows. References (`chg_tlens.analysis.ground_truths`): "
            "`final_stage` = heads picked by attention (+ direct effect on ioi), `full_circuit` = "
            f"final_stage plus every earlier head whose path-patching effect through a final-stage head's "
            f"q, k or v reaches {settings['share']:.0%} of the total, `necessity` = the "
            "full circuit's heads whose zero-ablation costs the task alone or once one other of them is "
            "gone. Methods in their published forms (`compare.METHODS`); ACDC and subnetwork probing "
            "are not run here (about an hour each on this CPU).", ""]
    for task, result in results.items():
        record, fits = result["references"], result["fits"]
        text += [f"## {task}", "",
                 f"{result['n']} prompts. Heads per reference: " + ", ".join(
                     f"{name} {len(record[name]['heads'])}" for name in REFERENCES) + "; final_stage: "
                 f"{record['final_stage']['rule']}; full_circuit's counterfactual: "
                 f"{record['full_circuit'].get('counterfactual', 'corrupt')} (total effect "
                 f"{record['full_circuit']['total_effect']:.3f} nats, {record['full_circuit']['passes']} "
                 "passes).",
                 "CHG: " + ("; ".join(f"{objective} objective: {fit['origin']}, certified stage x seed "
                                      f"rows {fit['certified']:.0%}" for objective, fit in fits.items())
                            if fits else "not read (no --chg-fit)") + "."
                 + ("" if "contrast" in fits or not settings["contrast"] else
                    " No fit with the contrast objective for this task."), "",
                 markdown_table(pd.DataFrame(result["table"])), ""]
        extra = record["full_circuit"]["effects"]
        if extra:
            text += ["Heads the full circuit adds (path-patching effect in nats through "
                     + "/".join(record["full_circuit"]["inputs"]) + "): "
                     + "; ".join(f"{head} " + "/".join(f"{v:+.3f}" for v in values)
                                 for head, values in extra.items()) + ".", ""]
        backups = [f"{head} (alone {row['alone']:+.3f}, with {'.'.join(map(str, row['partner']))} gone "
                   f"{row['with_partner']:+.3f})" for head, row in record["necessity"]["per_head"].items()
                   if row["with_partner"] > max(row["alone"], 0) * 2 and row["with_partner"] > 0.05]
        if backups:
            text += ["Heads that cost the task mainly once a partner is gone: " + "; ".join(backups) + ".",
                     ""]
    return "\n".join(text)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model = load_model("smollm2-135m")
    layout = adapter.require_model(model)
    results = {}
    for task in args.tasks:
        data = make_task(task, model, n=args.n, seed=0, **TASK_OPTIONS[task])
        record = references(model, task, data, args, out)
        scored, fits = method_scores(model, task, data, args, out)
        origins = {"nll": args.chg_fit, "contrast": args.chg_contrast_fit}
        fit_info = {objective: {"origin": origins[objective].format(task=task),
                                "certified": float(fit.convergence()["certified"].mean())}
                    for objective, fit in fits.items()}
        results[task] = {"n": len(data), "references": record, "fits": fit_info,
                         "table": table(record, scored, layout).to_dict(orient="records")}
    settings = {"command": "python benchmarks/reference_study.py " + " ".join(sys.argv[1:]),
                "share": args.share, "seconds": time.time() - started,
                "contrast": args.chg_contrast_fit is not None}
    text = report(results, settings)
    write_json({"settings": settings, "tasks": results}, out / "reference_study.json")
    (out / "reference_study.md").write_text(text)
    print(text)
    if args.docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        for name in ("reference_study.json", "reference_study.md"):
            shutil.copy(out / name, DOCS / name)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="study folder (results are cached here; rerun to continue)")
    parser.add_argument("--tasks", nargs="+", default=["induction", "ioi"], choices=list(TASK_OPTIONS))
    parser.add_argument("--n", type=int, default=8, help="prompts (seed 0): those the CHG fit saw")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--chg-fit", default=None,
                        help="a saved CHG fit made on the same prompts, {task} in its path")
    parser.add_argument("--chg-contrast-fit", default=None,
                        help="a saved CHG fit with objective='contrast' on the same prompts, {task} in its "
                             "path (scored beside --chg-fit as 'chg ... [contrast]')")
    parser.add_argument("--share", type=float, default=0.05,
                        help="full circuit and necessity: a head counts at this share of the total effect")
    parser.add_argument("--counterfactual", choices=["auto", "corrupt", "mean"], default="auto",
                        help="full circuit: the senders' counterfactual (auto: the corrupt twin). On "
                             "induction the twin leaves the first copy, where keys are read, unchanged")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", action="store_true", help="also write docs/results/reference_study/")
    return parser.parse_args()


if __name__ == "__main__":
    main()
