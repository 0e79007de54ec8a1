"""The command line, reports, figures, run folders and benchmarks: the only layer that prints."""
