"""Per-matrix analyses: pure functions of a base and a tuned matrix."""
