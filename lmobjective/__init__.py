"""lmobjective: next-token prediction under a causal mask, scored by masked cross-entropy."""
