"""lmobjective: what a language model is trained to do.

Objectives (next-token prediction, SFT, DPO/IPO/SimPO/RPO) behind one interface and one train step
(`lmobjective.objectives`, `lmobjective.step`); `lmobjective.restore(workdir)` opens a run,
`lmobjective.restore_hf(path)` a Hugging Face model directory.
"""

__all__ = ["restore", "restore_hf"]


def __getattr__(name):
  # Lazy, so `import lmobjective.model` does not pull in orbax: `lmobjective.restore(workdir)`,
  # `lmobjective.restore_hf(hf_dir)`.
  if name in __all__:
    from lmobjective.analysis import inspection
    return getattr(inspection, name)
  raise AttributeError(f"module 'lmobjective' has no attribute {name!r}")
