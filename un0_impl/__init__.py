"""Reference Un-0 generators: ``un0`` (gated sparse, few-step) and ``un0-osc`` (coupled oscillators)."""
