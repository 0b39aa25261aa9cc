"""Counters: what a generator's run executed, op by op (FLOPs, dtype, bytes, module path)."""
