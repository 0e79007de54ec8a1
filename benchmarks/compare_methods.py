"""Every head-scoring method on every benchmark model: who finds the heads that matter, at what cost.

    python benchmarks/compare_methods.py OUT_DIR [--skip-real] [--skip-trained] [--methods a,b]
                                                 [--n 64] [--real-n 64] [--real-tasks induction,ioi]

Benchmarks with known roles (``chg_tlens.benchmark_models``): planted circuits and a 2-layer model
trained here whose roles come from its attention patterns. Then, unless ``--skip-real``, the embedded
SmolLM2-135M on built-in tasks, where only the induction task has a reference (heads whose attention
patterns say "induction head"); the others get faithfulness and cost only.

Per method x benchmark: ROC AUC and precision at k for the facilitating heads, faithfulness at k (the
task with only the method's top-k heads kept, 1 = as good as the full model), and cost (example
forward/backward passes, seconds). Scores are fitted on one data draw and faithfulness measured on
another. Writes ``results.json`` and ``results.md`` into OUT_DIR and prints the Markdown.
The same run is ``chg-tlens compare --out OUT_DIR``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' patching draws a bar per call

import torch  # noqa: E402

from chg_tlens.analysis.compare import (  # noqa: E402
    METHODS,
    Benchmark,
    compare_methods,
    known_role_benchmarks,
    task_benchmark,
    tracr_benchmarks,
)
from chg_tlens.app.markdown import comparison_markdown  # noqa: E402
from chg_tlens.app.runs import jsonable, write_json  # noqa: E402
from chg_tlens.app.settings import DEMO_SETTINGS  # noqa: E402


def main() -> None:
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.methods is None else args.methods.split(",")
    frame, details = compare_methods(suite(args), methods, log=lambda line: print(line, flush=True),
                                     cache_dir=out / "cache")  # a stopped run continues
    write_json(jsonable({"rows": frame.to_dict("records"), "benchmarks": details}), out / "results.json")
    markdown = comparison_markdown(frame, details)
    (out / "results.md").write_text(markdown)
    print(markdown)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for results.json and results.md")
    parser.add_argument("--skip-real", action="store_true", help="skip the SmolLM2-135M tasks")
    parser.add_argument("--skip-trained", action="store_true", help="skip the model trained here")
    parser.add_argument("--skip-tracr", action="store_true", help="skip the compiled RASP programs")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--n", type=int, default=64, help="examples per benchmark-model data draw")
    parser.add_argument("--real-n", type=int, default=DEMO_SETTINGS["n_examples"],
                        help="examples per SmolLM2 task")
    parser.add_argument("--real-steps", type=int, default=DEMO_SETTINGS["steps"],
                        help="updates per CHG stage and of subnetwork probing on SmolLM2 (the demo's)")
    parser.add_argument("--real-tasks", default="induction,ioi", help="comma-separated task names")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return parser.parse_args()


def suite(args: argparse.Namespace) -> Iterator[Benchmark]:
    """Benchmark models first (known roles), then the real model's tasks."""
    yield from known_role_benchmarks(args.n, include_trained=not args.skip_trained)
    if not args.skip_tracr:
        yield from tracr_benchmarks(args.n)
    if args.skip_real:
        return
    from chg_tlens.models.load import load_model

    model = load_model("smollm2-135m", device="cpu")
    for task in args.real_tasks.split(","):
        yield task_benchmark(model, "smollm2", task, n=args.real_n, steps=args.real_steps,
                             n_seeds=DEMO_SETTINGS["n_seeds"], chg_batch=DEMO_SETTINGS["batch_size"])


if __name__ == "__main__":
    main()
