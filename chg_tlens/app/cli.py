"""``chg-tlens``: the command line. Library code stays silent; the words live here.

Exit codes: 0 ok; 2 bad input (one line on stderr): an ``InputError``, or an ``OSError`` about a path the
user named (see ``is_user_error``); 1 anything else, a bug, with its full traceback.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import sys
import textwrap
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from chg_tlens.app.settings import CPU_BUDGET, DEMO_SETTINGS, demo_fit_settings
from chg_tlens.errors import InputError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


class UsageError(InputError):
    """Bad usage the parser could not see (e.g. a combination of flags)."""


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from chg_tlens.core.config import CHGConfig, ContrastiveConfig

    parser = argparse.ArgumentParser(
        prog="chg-tlens",
        description="Causal Head Gating for TransformerLens: which attention heads facilitate, "
        "interfere with, or are irrelevant to a task.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = commands.add_parser("fit", help="three-stage CHG fit; writes a run folder",
                              description="Fit G0, G+ and G- gates on a task or data file and write a "
                              "run folder (results, roles.csv, pictures, report.html).")
    _model_arguments(fit)
    _data_arguments(fit)
    _config_arguments(fit, CHGConfig)
    fit.add_argument("--threshold", type=float, default=0.5, help="role score cut-off (default 0.5)")
    fit.add_argument("--prompt-resamples", type=int, default=0, metavar="N",
                     help="also fit N gate sets from seed 0's initial gates on bootstrap resamples of the "
                     "prompts, beside the seeds in one pass (chg_tlens.error_bars); the report then shows "
                     "error bars by source: optimiser, seeds, prompts (default 0: none)")
    _run_folder_arguments(fit, "run folder to write")
    fit.add_argument("--no-pictures", action="store_true", help="skip PNGs and report.html")
    _finish(fit, run_fit, device=MODEL_DEVICE)

    contrastive = commands.add_parser(
        "contrastive", help="contrastive CHG on a function task (ICL vs instruction)",
        description="Keep one way of posing a function task (in-context examples or an instruction) "
        "and remove the other; report accuracies before and after gating on held-out items.")
    _model_arguments(contrastive)
    contrastive.add_argument("--function", default="plural",
                             help="function task: plural, antonym, capital (default plural)")
    contrastive.add_argument("--retain", choices=list(RETAIN_VIEWS), default="icl",
                             help="the view to keep; the other is removed (default icl)")
    contrastive.add_argument("--n", type=int, default=64, help="training items (default 64)")
    contrastive.add_argument("--n-eval", type=int, default=32, help="held-out items (default 32)")
    _config_arguments(contrastive, ContrastiveConfig)
    _run_folder_arguments(contrastive, "folder to write")
    _finish(contrastive, run_contrastive, device=MODEL_DEVICE)

    validate = commands.add_parser(
        "validate", help="check a fit's roles on held-out data: ablation, sufficiency/necessity, patching",
        description="Rebuild the model and a held-out draw of the run's task (or its data file), then "
        "run targeted ablation, sufficiency and necessity against random head sets, and activation "
        "patching vs CHG facilitation (Welch t-test, Spearman) when the task has a corrupt twin. Adds "
        "validation.json, validation_ablation.csv and a picture to the run folder; rewrites report.html.")
    validate.add_argument("run_dir", type=Path, help="run folder written by 'chg-tlens fit' or 'demo'")
    validate.add_argument("--n", type=int, default=32, help="held-out examples for a task run (default 32)")
    validate.add_argument("--seed-index", type=int, default=0, help="which fitted seed to test (default 0)")
    validate.add_argument("--threshold", type=float, default=None, help="role cut-off (default: the run's)")
    validate.add_argument("--max-heads", type=int, default=20,
                          help="heads changed along each ablation curve (default 20)")
    validate.add_argument("--random", type=int, default=10,
                          help="random head sets for sufficiency/necessity (default 10)")
    validate.add_argument("--top-k", type=int, default=10,
                          help="heads flagged by patching for the t-test (default 10)")
    validate.add_argument("--no-patching", action="store_true", help="skip activation patching")
    validate.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    validate.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    _finish(validate, run_validate, device=MODEL_DEVICE)

    circuit = commands.add_parser(
        "circuit", help="wire a fit's facilitating heads into a circuit: path-patching edges, circuit.html",
        description="Rebuild the model and a held-out draw of the run's task (or its data file), take the "
        "heads the fit calls facilitating in every seed as nodes, measure every edge between them through "
        "the receiver's query, key and value and to the logits (path patching, with bootstrap intervals "
        "over prompts), keep the circuit alone against random circuits of its size, and write "
        "circuit.json and circuit.html into the run folder; rewrites report.html to link them.")
    circuit.add_argument("run_dir", type=Path, help="run folder written by 'chg-tlens fit' or 'demo'")
    circuit.add_argument("--n", type=int, default=32, help="held-out examples for a task run (default 32)")
    circuit.add_argument("--role-threshold", type=float, default=None,
                         help="role cut-off for the nodes (default: the run's)")
    circuit.add_argument("--min-confidence", type=float, default=0.0,
                         help="leave out heads whose role confidence is below this (default 0)")
    circuit.add_argument("--interfering", action="store_true", help="add the interfering heads as nodes")
    circuit.add_argument("--threshold", type=float, default=0.05,
                         help="keep an edge carrying at least this share of the total effect (default 0.05)")
    circuit.add_argument("--metric", choices=["logprob", "logit_diff"], default="logprob",
                         help="target log-prob (default, what CHG fits) or logit difference (needs a twin)")
    circuit.add_argument("--counterfactual", choices=["auto", "corrupt", "mean"], default="auto",
                         help="the corrupt twin, or each head's mean output (default: the twin if any)")
    circuit.add_argument("--exact", action="store_true",
                         help="exact path patching per edge (passes grow with nodes squared)")
    circuit.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the prompts")
    circuit.add_argument("--random", type=int, default=10,
                         help="random circuits of the same size to hold the circuit against (default 10)")
    circuit.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    _finish(circuit, run_circuit, device=MODEL_DEVICE)

    compare = commands.add_parser(
        "compare", help="CHG against patching, attribution, gradient and pruning baselines",
        description="Score heads with every method (or --methods) on benchmark models whose roles are "
        "known (planted circuits and a model trained on the spot) and, with --task, on a real model. "
        "Writes results.json and results.md (ROC AUC, precision and faithfulness at k, cost).")
    compare.add_argument("--out", type=Path, required=True,
                         help="folder for results.json and results.md; each method's scores are cached "
                              "under OUT/cache as they finish, so the same command continues a stopped run")
    compare.add_argument("--methods", default=None,
                         help="comma-separated subset of the methods (default: all); see --list-methods")
    compare.add_argument("--list-methods", action="store_true", help="print the method names and stop")
    compare.add_argument("--no-known", action="store_true", help="skip the known-role benchmark models")
    compare.add_argument("--tracr", action="store_true",
                         help="also score compiled RASP programs (needs the tracr extra)")
    compare.add_argument("--no-trained", action="store_true",
                         help="skip the benchmark model trained on the spot (saves ~1 min)")
    compare.add_argument("--n", type=int, default=64, help="examples per benchmark-model draw (default 64)")
    compare.add_argument("--model", default="smollm2-135m", help="model for --task (default smollm2-135m)")
    compare.add_argument("--task", action="append", default=[],
                         help="built-in task to compare on the real model (repeatable)")
    compare.add_argument("--task-n", type=int, default=CPU_BUDGET["n_examples"],
                         help=f"examples per real-model task (default {CPU_BUDGET['n_examples']})")
    compare.add_argument("--steps", type=int, default=CPU_BUDGET["steps"],
                         help="CHG updates per stage (and probing steps) on the real model "
                              f"(default {CPU_BUDGET['steps']}, a CPU budget)")
    compare.add_argument("--chg-seeds", type=int, default=CPU_BUDGET["n_seeds"],
                         help=f"CHG seeds on the real model (default {CPU_BUDGET['n_seeds']})")
    compare.add_argument("--chg-batch", type=int, default=CPU_BUDGET["batch_size"],
                         help=f"CHG batch on the real model (default {CPU_BUDGET['batch_size']})")
    compare.add_argument("--chg-fit", action="append", default=[], metavar="TASK=RESULT_DIR",
                         help="score CHG from a saved fit of TASK (same --task-n, seed 0) instead of "
                              "fitting; repeatable, several fits of one task are all scored")
    _finish(compare, run_compare, device="torch device for the --task model (default: the model's)")

    report = commands.add_parser("report", help="write report.html for a run folder")
    report.add_argument("run_dir", type=Path, help="run folder written by 'chg-tlens fit'")
    report.add_argument("--threshold", type=float, default=None, help="role cut-off (default: the run's)")
    _finish(report, run_report)

    demo = commands.add_parser(
        "demo", help="the main job: CHG on the embedded SmolLM2-135M, subject-verb agreement",
        description="Fit CHG on the embedded SmolLM2-135M-Instruct (offline) on subject-verb "
        f"agreement until every stage is certified ({_settings_text(DEMO_SETTINGS)}), print "
        "the role table and the certificate and write a run folder.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    demo.add_argument("--planted", action="store_true",
                      help="run on a planted-circuit toy model instead (seconds, known answer)")
    _finish(demo, run_demo, device=MODEL_DEVICE)
    return parser


MODEL_DEVICE = "torch device: cpu, cuda, cuda:1, mps ... (default: the model's)"
RETAIN_VIEWS = {"icl": "in_context", "instruction": "instruction"}
"""``contrastive --retain`` choices and the function-task view each keeps (``tasks.contrastive_splits``)."""
COMMON_FIELDS = {"progress", "device"}
"""Config fields set by the common flags (``--quiet``, ``--device``), not by a flag of their own."""


def _common_arguments(parser: argparse.ArgumentParser, device: str | None = None) -> None:
    """The flags every subcommand takes: ``--quiet`` and, where a model runs (``device`` = its help),
    ``--device``."""
    group = parser.add_argument_group("common options")
    group.add_argument("--quiet", action="store_true",
                       help="no progress bars or progress lines (results are still printed)")
    if device is not None:
        group.add_argument("--device", default=None, help=device)


def _finish(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int],
            device: str | None = None) -> None:
    """The common flags every subcommand takes, and the function that runs it."""
    _common_arguments(parser, device=device)
    parser.set_defaults(handler=handler)


def _run_folder_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--out`` and ``--resume``: where a fit writes, and continuing it there after an interruption."""
    parser.add_argument("--out", type=Path, required=True, help=what)
    parser.add_argument("--resume", action="store_true", help="continue the interrupted fit in --out")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="'smollm2-135m' (embedded, default), a hub name, a local HF folder, or a .gguf")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", help="built-in task name (see chg_tlens.tasks.TASKS)")
    group.add_argument("--data", type=Path, help="JSONL / JSON / CSV file or a datasets folder")
    parser.add_argument("--n", type=int, default=64, help="examples to generate for --task (default 64)")
    parser.add_argument("--prompt-field", default="prompt", help="prompt column of --data")
    parser.add_argument("--target-field", default="target", help="target column of --data")
    parser.add_argument("--text-field", default=None, help="plain-text column of --data (every token counts)")


def _config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per config field, with the field's docstring as help, so --help is always complete."""
    docs = field_docs(config_class)
    group = parser.add_argument_group(f"{config_class.__name__} (paper defaults)")
    hints = typing.get_type_hints(config_class)
    for spec in fields(config_class):
        if spec.name in COMMON_FIELDS:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not MISSING else None
        help_text = f"{docs.get(spec.name, '')} (default {default})".replace("%", "%%")  # argparse %-formats
        hint = hints[spec.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = options[0] if len(options) == 1 else str
        origin = typing.get_origin(hint)
        if hint is bool:  # "--flag True" would arrive as a string, and "False" is truthy
            action = group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            action.help = help_text  # set after: Python 3.10 appends its own default to the help
        elif origin is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(hint), default=default, help=help_text)
        elif origin is tuple:
            group.add_argument(flag, type=float, nargs=2, metavar=("START", "END"), default=default,
                               help=help_text)
        elif hint in (int, float):
            group.add_argument(flag, type=hint, default=default, help=help_text)
        else:
            group.add_argument(flag, default=default, help=help_text)


def field_docs(config_class: type) -> dict[str, str]:
    """The docstring under each dataclass field (read from source, base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for first, second in zip(body, body[1:], strict=False):
            if (isinstance(first, ast.AnnAssign) and isinstance(first.target, ast.Name)
                    and isinstance(second, ast.Expr) and isinstance(second.value, ast.Constant)):
                docs[first.target.id] = " ".join(str(second.value.value).split())
    return docs


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    values = {}
    for spec in fields(config_class):
        if spec.name == "progress":
            values["progress"] = not args.quiet
        elif hasattr(args, spec.name):
            value = getattr(args, spec.name)
            values[spec.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**values).validate()


# ----------------------------------------------------------------------------------- commands
def run_fit(args: argparse.Namespace) -> int:
    import torch

    from chg_tlens import CHGConfig, fit_chg
    from chg_tlens.app.runs import write_run_folder
    from chg_tlens.core import distributed
    from chg_tlens.core.data import GateData
    from chg_tlens.models.load import load_model
    from chg_tlens.tasks import TASKS, make_task

    config = config_from_args(CHGConfig, args)
    _check_threshold(args.threshold)
    if distributed.init_from_environment(config.device) and torch.cuda.is_available():
        config.device = config.device or f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if args.data is not None and not args.data.exists():
        raise UsageError(f"--data: file not found: {args.data}")
    if args.task is not None and args.task not in TASKS:
        raise UsageError(f"--task: unknown task {args.task!r}; the tasks are {list(TASKS)}.")
    model = load_model(args.model, device=config.device, dtype=args.dtype)
    if args.task is not None:
        data = make_task(args.task, model, n=args.n, seed=config.seed)
        source = {"task": args.task, "n": args.n}
    else:
        data = GateData.from_file(model, args.data, args.prompt_field, args.target_field, args.text_field)
        source = {"data": str(args.data), "prompt_field": args.prompt_field,
                  "target_field": args.target_field, "text_field": args.text_field}
    if args.prompt_resamples < 0:
        raise UsageError(f"--prompt-resamples must be at least 0, got {args.prompt_resamples}.")
    started = time.time()
    prompts = None
    if args.prompt_resamples:
        from chg_tlens.analysis.error_bars import error_bars

        bars = error_bars(model, data, config, n_resamples=args.prompt_resamples, run_dir=args.out,
                          resume=args.resume)
        result, prompts = bars.seeds, bars.prompts
    else:
        result = fit_chg(model, data, config, run_dir=args.out, resume=args.resume)
    if not distributed.is_main_process():
        return EXIT_OK
    info = {"command": _command_line(), "model": args.model, **source, "seconds": time.time() - started,
            "processes": distributed.world()[1], "prompt_resamples": args.prompt_resamples}
    write_run_folder(result, args.out, info, args.threshold, pictures=not args.no_pictures,
                     report=not args.no_pictures, prompt_resamples=prompts)
    _print_roles(result, args.threshold, args.out)
    return EXIT_OK


def run_contrastive(args: argparse.Namespace) -> int:
    from chg_tlens import ContrastiveConfig, fit_contrastive_chg
    from chg_tlens.app.runs import write_contrastive_run_folder, write_json
    from chg_tlens.models.load import load_model
    from chg_tlens.tasks import contrastive_splits

    config = config_from_args(ContrastiveConfig, args)
    model = load_model(args.model, device=config.device, dtype=args.dtype)
    train, held_out = contrastive_splits(model, args.function, RETAIN_VIEWS[args.retain], args.n,
                                         args.n_eval, config.seed)
    started = time.time()
    result = fit_contrastive_chg(model, train, config, eval_data=held_out, run_dir=args.out,
                                 resume=args.resume)
    table = result.table()
    write_json({"function": args.function, "retain": args.retain, "table": table.to_dict("records"),
                "closed_heads_every_seed": result.closed_heads(), "config": result.config,
                "provenance": result.provenance}, args.out / "contrastive.json")  # kept for older readers
    info = {"command": _command_line(), "model": args.model, "function": args.function, "retain": args.retain,
            "n": args.n, "n_eval": args.n_eval, "seconds": time.time() - started}
    write_contrastive_run_folder(result, args.out, info)
    print(f"contrastive CHG, {args.function}: retain {args.retain}, remove the other view")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"heads closed in every seed: {result.closed_heads()}")
    print(f"run folder: {args.out}  (report: {args.out / 'report.html'})")
    if result.trace:
        print("\nConvergence certificate (details: result.convergence())")
        print(result.convergence_text(config.threshold))
    return EXIT_OK


def run_validate(args: argparse.Namespace) -> int:
    """``chg-tlens validate``: ``chg_tlens.validate``'s standard set on a run folder (the roles' causal
    checks; ``config_from_args``' ``validate()`` only checks settings, a name shared on purpose)."""
    from chg_tlens.app.plot import ablation_curves, figure_png
    from chg_tlens.app.report import write_report
    from chg_tlens.app.runs import add_validation, write_table
    from chg_tlens.app.validation import validate_run
    from chg_tlens.core.result import CHGResult

    run = _read_run_file(args.run_dir, "validate")
    threshold = run.get("threshold", 0.5) if args.threshold is None else args.threshold
    _check_threshold(threshold)
    for name in ("n", "max_heads", "batch_size", "top_k"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    result = CHGResult.load(args.run_dir)
    model, data, held_out = _validation_model_and_data(run, result, args)
    summary, ablation = validate_run(model, data, result, seed=args.seed_index, threshold=threshold,
                                     max_heads=args.max_heads, n_random=args.random, top_k=args.top_k,
                                     patching=not args.no_patching, batch_size=args.batch_size)
    summary["held_out"] = held_out
    write_table(ablation, args.run_dir / "validation_ablation.csv")
    (args.run_dir / "pictures").mkdir(exist_ok=True)
    figure = ablation_curves(ablation, title=f"targeted ablation from G+ (seed {summary['seed']})")
    (args.run_dir / "pictures" / "validation_ablation.png").write_bytes(figure_png(figure, dpi=100))
    add_validation(args.run_dir, "chg_tlens_validate", summary)
    report = write_report(args.run_dir, threshold=threshold)
    _print_validation(summary)
    print(f"\nwrote {args.run_dir / 'validation.json'} and {report}")
    return EXIT_OK


def _read_run_file(run_dir: Path, command: str) -> dict[str, Any]:
    """The run folder's ``run.json``: what was run, which the commands that rebuild a run read."""
    import json

    from chg_tlens.app.report import RUN_FILE

    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise UsageError(f"{run_file} not found: {command} needs a run folder written by "
                         "'chg-tlens fit' or 'chg-tlens demo'.")
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{run_file} is not valid JSON ({error.msg}, line {error.lineno}).") from None
    except UnicodeDecodeError:
        raise InputError(f"{run_file} is not UTF-8 text; is it a run.json written by chg-tlens?") from None
    if not isinstance(run, dict):
        raise InputError(f"{run_file} should hold a JSON object, found {type(run).__name__}.")
    return run


def run_circuit(args: argparse.Namespace) -> int:
    """``chg-tlens circuit``: :func:`chg_tlens.circuit` of a run's facilitating heads on held-out data,
    kept alone against random circuits; ``circuit.json`` and ``circuit.html`` in the run folder."""
    from chg_tlens.analysis.circuit import CIRCUIT_FILE, CIRCUIT_HTML, circuit, head_name
    from chg_tlens.app.report import write_report
    from chg_tlens.core.result import CHGResult

    run = _read_run_file(args.run_dir, "circuit")
    role_threshold = run.get("threshold", 0.5) if args.role_threshold is None else args.role_threshold
    _check_threshold(role_threshold)
    for name in ("n", "n_boot"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.random < 0:
        raise UsageError(f"--random must be at least 0, got {args.random}.")
    result = CHGResult.load(args.run_dir)
    model, data, held_out = _validation_model_and_data(run, result, args)
    found = circuit(model, data, result, interfering=args.interfering, min_confidence=args.min_confidence,
                    role_threshold=role_threshold, metric=args.metric, counterfactual=args.counterfactual,
                    threshold=args.threshold, exact=args.exact, n_boot=args.n_boot)
    found.provenance["held_out"] = held_out
    ablation = found.ablate(model, data, n_random=args.random) if args.random else None
    path = found.save(args.run_dir / CIRCUIT_FILE)
    page = found.write_html(args.run_dir / CIRCUIT_HTML, title=f"Circuit: {args.run_dir.resolve().name}")
    report = write_report(args.run_dir, threshold=role_threshold)
    held = "held-out" if held_out else "the fit's own"
    print(f"circuit of {len(found.nodes)} nodes on {found.n_examples} {held} examples "
          f"({found.counterfactual} counterfactual, {found.metric}): {len(found.kept_edges())} of "
          f"{len(found.edges)} edges kept at {found.threshold:g} of the total effect "
          f"{found.total_effect:.4g}; {found.passes} passes, {found.seconds:.1f} s")
    for edge in found.kept_edges():
        target = "logits" if edge.receiver == "logits" else f"{head_name(edge.receiver)} {edge.input}"
        print(f"  {head_name(edge.sender)} -> {target}: {edge.effect:+.4f} "
              f"[{edge.low:+.4f}, {edge.high:+.4f}]")
    if ablation is not None:
        print(f"kept alone it keeps {ablation.share:.1%} of the metric; {len(ablation.random)} random "
              f"circuits of its size {ablation.random_mean:.1%} +- {ablation.random_std:.1%}")
    print(f"\nwrote {path}, {page} and {report}")
    return EXIT_OK


def _validation_model_and_data(run: dict[str, Any], result: Any, args: argparse.Namespace
                               ) -> tuple[Any, Any, bool]:
    """The run's model and a fresh draw of its data: a new seed for a task (held out), the same file
    otherwise. Returns (model, data, whether the data is held out)."""
    seed = int(result.config.get("seed", 0)) + 1000
    model_name = run.get("model")
    if model_name == "planted-repeat":
        from chg_tlens.testbeds.planted import repeat_circuit

        circuit = repeat_circuit()
        return circuit.model, circuit.data(args.n, seed), True
    if not model_name:
        raise InputError("run.json names no model; cannot rebuild the run.")
    from chg_tlens.models.load import load_model

    model = load_model(model_name, device=args.device, dtype=args.dtype)
    if run.get("task"):
        from chg_tlens.tasks import make_task

        return model, make_task(run["task"], model, n=args.n, seed=seed), True
    if run.get("data"):
        from chg_tlens.core.data import GateData

        path = Path(run["data"])
        if not path.exists():
            raise InputError(f"the run's data file is gone: {path} (named in run.json)")
        data = GateData.from_file(model, path, run.get("prompt_field", "prompt"),
                                  run.get("target_field", "target"), run.get("text_field"))
        return model, data, False
    raise InputError("run.json names neither a task nor a data file; cannot rebuild the data.")


def _print_validation(summary: dict[str, Any]) -> None:
    held = "held-out" if summary.get("held_out") else "the fit's own"
    print(f"validation of seed {summary['seed']} on {summary['n_examples']} {held} examples; "
          f"{len(summary['facilitating_heads'])} facilitating heads")
    for name in ("sufficiency", "necessity"):
        block = summary[name]
        if "skipped" in block:
            print(f"  {name}: skipped ({block['skipped']})")
            continue
        line = (f"  {name}: log-prob full {block['full model']['logprob']:.3f}, circuit "
                f"{block['circuit']['logprob']:.3f}, no heads {block['no heads']['logprob']:.3f}")
        if "random_mean" in block:
            line += (f", random sets {block['random_mean']['logprob']:.3f} (circuit as strong as or "
                     f"stronger than {block['circuit_at_least_as_strong_share']:.0%} of them)")
        print(line)
    for score, block in summary["ablation"].items():
        where = "the full model" if block.get("start") == "ones" else "G+"
        line = (f"  ablation from {where} of the top {block['k']} {score} heads: "
                f"change in log-prob {block['delta_logprob_at_k']:+.3f}")
        if block.get("random_min_at_k") is not None:
            line += (f" (random orders {block['random_min_at_k']:+.3f} to {block['random_max_at_k']:+.3f}; "
                     f"expected: {block['expected']})")
        print(line)
    patching = summary["activation_patching"]
    if "skipped" in patching:
        print(f"  activation patching: skipped ({patching['skipped']})")
    else:
        print(f"  activation patching top-{patching['n_flagged']} vs rest, CHG facilitation "
              f"{patching['facilitation_flagged']:.3f} vs {patching['facilitation_rest']:.3f}: "
              f"Welch t = {patching['t']:.2f}, p = {patching['p']:.2g}; Spearman rho = "
              f"{patching['spearman_rho']:.2f}")


def _saved_fits(specs: Sequence[str], tasks: Sequence[str]) -> dict[str, list[Any]]:
    """``TASK=RESULT_DIR`` options -> saved CHG fits per task, read before any model is loaded."""
    from chg_tlens.core.result import CHGResult

    fits: dict[str, list[Any]] = {}
    for spec in specs:
        task, sep, folder = spec.partition("=")
        if not sep or not task or not folder:
            raise UsageError(f"--chg-fit: expected TASK=RESULT_DIR, got {spec!r}.")
        if task not in tasks:
            raise UsageError(f"--chg-fit {spec!r}: {task!r} is not one of the --task values {list(tasks)}.")
        fits.setdefault(task, []).append(CHGResult.load(folder))
    return fits


def run_compare(args: argparse.Namespace) -> int:
    from chg_tlens.analysis.compare import (
        METHOD_ALIASES,
        METHODS,
        compare_methods,
        known_role_benchmarks,
        task_benchmark,
        tracr_benchmarks,
    )
    from chg_tlens.analysis.patching import silent_patching_progress
    from chg_tlens.app.markdown import comparison_markdown
    from chg_tlens.app.runs import jsonable, write_json

    if args.list_methods:
        print("\n".join(METHODS))
        return EXIT_OK
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods or [] if m not in METHODS and m not in METHOD_ALIASES]
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; choose from {list(METHODS)}.")
    if args.no_known and not args.task:
        raise UsageError("nothing to compare: --no-known without any --task.")
    for name in ("n", "task_n", "steps", "chg_seeds", "chg_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    chg_fits = _saved_fits(args.chg_fit, args.task)

    def suite() -> Any:
        if not args.no_known:
            yield from known_role_benchmarks(args.n, include_trained=not args.no_trained)
        if args.tracr:
            yield from tracr_benchmarks(args.n)
        if args.task:
            from chg_tlens.models.load import load_model

            model = load_model(args.model, device=args.device)
            for task in args.task:
                yield task_benchmark(model, args.model, task, n=args.task_n, steps=args.steps,
                                     n_seeds=args.chg_seeds, chg_batch=args.chg_batch,
                                     chg_fits=chg_fits.get(task, ()))

    log = None if args.quiet else (lambda line: print(line, flush=True))
    with silent_patching_progress():  # TransformerLens' patching draws a bar per call: always too many
        frame, details = compare_methods(suite(), methods, log=log, cache_dir=args.out / "cache")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(jsonable({"rows": frame.to_dict("records"), "benchmarks": details}), args.out / "results.json")
    markdown = comparison_markdown(frame, details)
    (args.out / "results.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    from chg_tlens.app.report import write_report

    if args.threshold is not None:
        _check_threshold(args.threshold)
    if not args.run_dir.is_dir():
        found = "a file" if args.run_dir.exists() else "nothing"
        raise UsageError(f"run_dir: expected a run folder written by 'chg-tlens fit' or 'chg-tlens "
                         f"contrastive', found {found} at {args.run_dir}.")
    path = write_report(args.run_dir, threshold=args.threshold)
    print(f"wrote {path}")
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    from chg_tlens import CHGConfig, fit_chg
    from chg_tlens.app.runs import write_run_folder

    started = time.time()
    if args.planted:
        from chg_tlens.testbeds.planted import repeat_circuit

        circuit = repeat_circuit()
        model, data, name = circuit.model, circuit.data(128, 0), "planted-repeat"
        config = CHGConfig(n_seeds=4, steps=150, batch_size=32, progress=not args.quiet, device=args.device)
    else:
        from chg_tlens.models.load import load_model
        from chg_tlens.tasks import make_task

        model = load_model("smollm2-135m", device=args.device)
        data = make_task(DEMO_SETTINGS["task"], model, n=DEMO_SETTINGS["n_examples"], seed=0)
        name = "smollm2-135m"
        config = CHGConfig(batch_size=len(data), progress=not args.quiet, device=args.device,
                           **demo_fit_settings())
    loaded = time.time()
    budget = (f"L-BFGS on all {len(data)} examples, stopping once certified (ceiling {config.steps})"
              if config.optimizer == "lbfgs"
              else f"{config.steps} steps x 3 stages, batch {config.batch_size}")
    print(f"CHG demo: {name}, task {data.meta.get('task', '?')}, {len(data)} examples, "
          f"{config.n_seeds} seed(s), {budget}")
    result = fit_chg(model, data, config)
    fitted = time.time()
    info = {"command": _command_line(), "model": name, "task": data.meta.get("task"),
            "load_seconds": loaded - started, "fit_seconds": fitted - loaded}
    write_run_folder(result, args.out, info)
    _print_roles(result, 0.5, args.out)
    print(f"time: load {loaded - started:.1f} s, fit {fitted - loaded:.1f} s, "
          f"total {time.time() - started:.1f} s")
    return EXIT_OK


# ----------------------------------------------------------------------------------- output
def _print_roles(result: Any, threshold: float, out: Path) -> None:
    summary = result.summary(threshold)
    print("\nShare of heads per role (rows: seeds; last row: same role in every seed)")
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    consensus = result.roles(threshold)
    for role in ("facilitating", "interfering"):
        heads = consensus[role]
        shown = ", ".join(f"{layer}.{head}" for layer, head in heads[:20])
        more = f" (+{len(heads) - 20} more)" if len(heads) > 20 else ""
        print(f"{role} in every seed ({len(heads)}): {shown or '-'}{more}")
    if result.trace:
        print("\nConvergence certificate (details: result.convergence())")
        print(summary.attrs["convergence"])
    print(f"\nrun folder: {out}  (report: {out / 'report.html'})")


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())


def _check_threshold(threshold: float) -> None:
    from chg_tlens.core import checks

    checks.unit_interval(threshold, "--threshold")


def _command_line() -> str:
    return " ".join(["chg-tlens", *sys.argv[1:]])


# ----------------------------------------------------------------------------------- entry
def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and map failures to exit codes: bad input is one line, a bug is a traceback."""
    from chg_tlens.analysis.patching import silent_patching_progress

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with silent_patching_progress(args.quiet):
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"chg-tlens {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as error:
        if is_user_error(error, args):
            text = str(error).strip()
            message = text.splitlines()[0] if text else type(error).__name__
            print(f"chg-tlens {args.command}: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        import traceback

        traceback.print_exc()
        print(f"chg-tlens {args.command}: internal error (a bug; please report it with the trace above)",
              file=sys.stderr)
        return EXIT_INTERNAL


PATH_ARGUMENTS = ("run_dir", "out", "data", "model")
"""Arguments whose value is a path the user names. ``--model`` is a path only when it names a local folder
or .gguf; as a hub name it matches no file. Other strings (``--task sva``) are never paths."""

FOLDER_ARGUMENTS = ("run_dir", "out")
"""Folders the CLI reads and writes its own files directly in (``run.json``, ``chg_result.json``,
``report.html``, ``results.json``, ``pictures``, ...); ``--chg-fit``'s RESULT_DIR is one too."""


def is_user_error(error: BaseException, args: argparse.Namespace) -> bool:
    """True for bad input (exit 2): an ``InputError``, or an ``OSError`` whose filename is a path the
    user named (``user_paths``) or a file directly inside a folder the user named for the CLI's own files.

    Deliberately narrow: a file error anywhere deeper (``--out .`` and a file missing from the installed
    package, a cache entry under ``OUT/cache/...``) or about a path no argument named is a bug, so it
    keeps its traceback (exit 1) instead of reading as the user's mistake.
    """
    if isinstance(error, InputError):
        return True
    if not isinstance(error, OSError):
        return False
    named = [_absolute(name) for name in (error.filename, error.filename2)
             if isinstance(name, (str, bytes, os.PathLike)) and name]
    paths, folders = user_paths(args)
    return any(path in paths or path.parent in folders for path in named)


def user_paths(args: argparse.Namespace) -> tuple[set[Path], set[Path]]:
    """The paths the user named on the command line, and those of them that are folders the CLI keeps
    its own files in; both absolute. Only ``PATH_ARGUMENTS`` and ``--chg-fit``'s RESULT_DIR count."""
    paths: set[Path] = set()
    folders: set[Path] = set()
    for key in PATH_ARGUMENTS:
        value = getattr(args, key, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            paths.add(_absolute(value))
            if key in FOLDER_ARGUMENTS:
                folders.add(_absolute(value))
    for spec in getattr(args, "chg_fit", None) or []:
        folder = str(spec).partition("=")[2]
        if folder:
            paths.add(_absolute(folder))
            folders.add(_absolute(folder))
    return paths, folders


def _absolute(path: str | bytes | os.PathLike) -> Path:
    path = Path(os.fsdecode(path)).expanduser()
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the plain absolute path
        return path.absolute()

if __name__ == "__main__":
    sys.exit(main())
