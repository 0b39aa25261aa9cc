"""How one thing is measured.

The protocol (warm-up, repeated windows, idle, phases), its statistics, the host state around the
windows and the environment a record names. The meters and counters are the sibling packages.
"""
