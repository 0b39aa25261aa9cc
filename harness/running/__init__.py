"""Planning and running a sweep.

The per-axis configs, the frozen plan, the runner (the driver) and one cell's measurement, the
typed record and its JSONL stores, and the Python API (``un0_bench.measure``). Executors are the
sibling package.
"""
