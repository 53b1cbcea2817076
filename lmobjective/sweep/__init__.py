"""Ablations past one run: sweep spec files (`spec`), the runner (local, parallel, SLURM),
results tables and plots, and the data-mixing-law fit (`mixture_regression`)."""
