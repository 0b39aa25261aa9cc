"""Baseline generators: one file per efficiency technique, each a :class:`harness.generator.Generator`."""
