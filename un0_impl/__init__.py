"""Reference Un-0s: ``un0`` (gated sparse on digits, ``contextual`` on pipelines) and ``un0-osc`` (oscillators)."""
