"""The one symmetric per-channel int8 weight quantiser, for every technique and storage format that needs one.

The int8 layers (``baselines/int8.py``), the distilled students' storage (``baselines/distilled.py``)
and the gated ``un0``'s storage (``un0_impl/gated.py``) all quantise weights the same way: one scale
per channel, max |w| / 127, codes in [-127, 127] so that -w quantises to -q.
"""

from __future__ import annotations

import torch

#: Largest int8 code used. Symmetric quantisation uses [-127, 127] so that -x quantises to -q.
QMAX = 127


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation with one scale per channel (dim 0) of ``weight`` ``(C, ...)``.

    A channel is everything in ``weight[c]``. To quantise rows of the last dimension instead (one
    scale per row of a ``(..., K)`` tensor), pass ``weight.reshape(-1, K)``.

    Returns:
        ``(q, scale)``: ``q`` int8 of ``weight``'s shape with ``weight ~= q * scale[:, None, ...]``,
        and ``scale`` ``(C,)`` float32: max |w| of the channel / 127, or 1.0 where that is zero (an
        all-zero channel: any scale quantises it exactly, and 1.0 keeps dequantisation free of
        denormals).
    """
    # NB: the three earlier copies guarded the zero channel differently (1.0; a floor of 1e-12 on
    # max |w|; a floor of float32's smallest normal on the scale). They agree on every channel whose
    # max |w| is at least 1e-12, which is every channel of the shipped weights (the smallest scale in
    # them is 2.1e-5), so unifying them changed no shipped bit.
    w = weight.detach().float()
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1) / QMAX  # (C,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale
