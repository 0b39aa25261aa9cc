"""Weights files and what they cost.

Checkpoints (save, load, check against their metadata), the one int8 per-channel weight quantiser,
and the energy a derivation (training, calibration) spends.
"""
