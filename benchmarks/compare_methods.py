"""Every head-scoring method on every benchmark model: who finds the heads that matter, at what cost.

    python benchmarks/compare_methods.py OUT_DIR [--skip-real] [--skip-trained] [--skip-tracr]
                                                 [--methods a,b] [--n 64] [--real-n 64]
                                                 [--real-tasks induction,ioi] [--device cpu]
                                                 [--threads 1]

The full suite of ``chg-tlens compare`` (which this runs, so the two never drift apart): the known-role
models (planted circuits, the 32-head composite model, a 2-layer model trained here), the compiled
RASP programs (tracr extra), then the embedded SmolLM2-135M on built-in tasks, where induction and ioi
have attention-pattern references (induction heads; name movers signed by their direct effect).

Per method x benchmark: ROC AUC and precision at k for the facilitating heads, faithfulness at k (the
task with only the method's top-k heads kept, 1 = as good as the full model), and cost (example
forward/backward passes, seconds). Scores are fitted on one data draw and faithfulness measured on
another. Writes ``results.json`` and ``results.md`` into OUT_DIR (each method's scores cached under
``OUT_DIR/cache``, so the same command continues a stopped run) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import sys

import torch

from chg_tlens.app import cli
from chg_tlens.app.settings import CPU_BUDGET


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return cli.main(compare_argv(args))


def compare_argv(args: argparse.Namespace) -> list[str]:
    """The ``chg-tlens compare`` command line this script's options stand for."""
    argv = ["compare", "--out", args.out_dir, "--n", str(args.n), "--device", args.device]
    if args.methods is not None:
        argv += ["--methods", args.methods]
    if args.skip_trained:
        argv.append("--no-trained")
    if not args.skip_tracr:
        argv.append("--tracr")
    if not args.skip_real:
        for task in (t.strip() for t in args.real_tasks.split(",") if t.strip()):
            argv += ["--task", task]
        argv += ["--task-n", str(args.real_n), "--steps", str(args.real_steps)]
    return argv


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for results.json and results.md")
    parser.add_argument("--skip-real", action="store_true", help="skip the SmolLM2-135M tasks")
    parser.add_argument("--skip-trained", action="store_true", help="skip the model trained here")
    parser.add_argument("--skip-tracr", action="store_true", help="skip the compiled RASP programs")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset (chg-tlens compare --list-methods)")
    parser.add_argument("--n", type=int, default=64, help="examples per benchmark-model data draw")
    parser.add_argument("--real-n", type=int, default=CPU_BUDGET["n_examples"],
                        help="examples per SmolLM2 task")
    parser.add_argument("--real-steps", type=int, default=CPU_BUDGET["steps"],
                        help="updates per CHG stage and of subnetwork probing on SmolLM2 (a CPU budget)")
    parser.add_argument("--real-tasks", default="induction,ioi", help="comma-separated task names")
    parser.add_argument("--device", default="cpu", help="torch device for SmolLM2 (default cpu, as timed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
