"""Looking at a run: restore it in a notebook (`inspection`), score text (`evaluate`), sample
(`generate`), loss by context position, loss-curve diagnostics, plots, and the CLI's post-run steps."""
