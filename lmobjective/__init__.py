"""lmobjective: next-token prediction under a causal mask, scored by masked cross-entropy."""

__all__ = ["restore"]


def __getattr__(name):
  # Lazy, so `import lmobjective.model` does not pull in orbax: `lmobjective.restore(workdir)`.
  if name == "restore":
    from lmobjective.analysis.inspection import restore
    return restore
  raise AttributeError(f"module 'lmobjective' has no attribute {name!r}")
