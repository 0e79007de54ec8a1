"""Settings the app layer shares (the CLI's demo and the benchmarks that time it)."""

DEMO_SETTINGS = dict(task="sva", n_examples=64, n_seeds=2, batch_size=8, steps=100)
"""``chg-tlens demo`` / ``make demo``: the embedded SmolLM2-135M on subject-verb agreement."""
