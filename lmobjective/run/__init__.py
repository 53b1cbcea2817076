"""Running one experiment: build it (`experiment`), train it (`train`), checkpoint and resume it,
log its metrics, survive preemption, span hosts. Depends on the core modules, `data` and
`validation` only (tests/test_layout.py)."""
