"""Everything after registration: the served model, exports with parity, prediction."""
