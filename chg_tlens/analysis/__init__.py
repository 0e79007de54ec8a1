"""What to do with gates and roles: ablation, patching, mediation, accuracy, baselines and comparisons."""
