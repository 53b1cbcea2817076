"""lmobjective: what a language model is trained to do.

Objectives (next-token prediction, SFT, DPO/IPO/SimPO/RPO) behind one interface and one train step
(`lmobjective.objectives`, `lmobjective.step`); `lmobjective.restore(workdir)` opens a run.
"""

__all__ = ["restore"]


def __getattr__(name):
  # Lazy, so `import lmobjective.model` does not pull in orbax: `lmobjective.restore(workdir)`.
  if name == "restore":
    from lmobjective.analysis.inspection import restore
    return restore
  raise AttributeError(f"module 'lmobjective' has no attribute {name!r}")
