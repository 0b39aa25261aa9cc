"""Counted work projected onto hardware.

The per-operator roofline onto a GPU profile (``roofline``, calibrated by the shipped
``projection_calibration.json``) and the fit of a host's energy coefficients (``calibrate``).
"""
