"""Speed benchmarks of chg_tlens (the same as ``chg-tlens bench``): see chg_tlens/bench.py.

    python benchmarks/bench_speed.py OUT_DIR [--skip-real] [--repeats 5] [--device cpu]

Writes bench.json and bench.md into OUT_DIR and prints the Markdown. Run it on a quiet machine: the
1-minute load average is recorded with every row, and numbers taken under load mislead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from chg_tlens.app.bench import MARKDOWN_FILE, run_benchmarks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for bench.json and bench.md")
    parser.add_argument("--skip-real", action="store_true", help="tiny and planted models only (seconds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    args = parser.parse_args()
    run_benchmarks(args.out, skip_real=args.skip_real, repeats=args.repeats, device=args.device)
    print((args.out / MARKDOWN_FILE).read_text())


if __name__ == "__main__":
    main()
