"""Conversions that belong to reports only: kWh, gCO2e, per 1,000 images, multiples of the Landauer bound."""

from __future__ import annotations

import math

J_PER_KWH = 3.6e6
BOLTZMANN_J_PER_K = 1.380649e-23
#: Landauer bound kT ln 2 at 300 K: 2.87e-21 J per bit erased.
LANDAUER_J_PER_BIT_300K = BOLTZMANN_J_PER_K * 300.0 * math.log(2)
DTYPE_BITS = {"float64": 64, "float32": 32, "bfloat16": 16, "float16": 16, "int64": 64, "int32": 32,
              "int16": 16, "int8": 8, "uint8": 8, "bool": 1}


def kwh_per_1000_images(energy_j_per_image: float) -> float:
    return energy_j_per_image * 1000.0 / J_PER_KWH


def gco2e_per_1000_images(energy_j_per_image: float, grid_gco2_per_kwh: float) -> float:
    return kwh_per_1000_images(energy_j_per_image) * grid_gco2_per_kwh


def operand_bits(flops_by_dtype: dict[str, float]) -> float:
    """Bits processed per image: FLOPs x the width of their dtype.

    NB: a physical reference point, not a bound on any real design: it assumes every operation
    irreversibly erases as many bits as its result is wide.
    """
    return sum(f * DTYPE_BITS.get(d, 32) for d, f in flops_by_dtype.items())


def landauer_multiple(energy_j_per_image: float, flops_by_dtype: dict[str, float]) -> float | None:
    bits = operand_bits(flops_by_dtype)
    return energy_j_per_image / (bits * LANDAUER_J_PER_BIT_300K) if bits > 0 else None
