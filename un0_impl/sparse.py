"""Neuron-gated sparse MLP layers: a prompt gate, compact gathered weights, and their cache.

A :class:`GatedMLP` is a stack of ``blocks`` residual MLP blocks of width ``dim`` with ``hidden``
units each. For a prompt, :class:`PromptGate` scores every hidden unit of every block; top-k keeps
``kept_units(keep, hidden)`` units per block. Execution is truly sparse: the kept rows of the first
matrix and of the *transposed* second matrix (stored as ``w2t`` so the gather reads contiguous rows)
are gathered once per prompt into a :class:`CompactMLP`, which then runs every image and every step
of that prompt with small dense matmuls. :class:`SubnetCache` keeps compact sub-networks keyed by
(prompt label, keep), so a repeated prompt skips the gate and the gather.

Cost attribution: the gate module is marked with :func:`~un0_bench.harness.counters.ops.mark_gating` and the
top-k and gather run inside :func:`~un0_bench.harness.counters.ops.gating_scope`, so a counter records them
with role ``"gating"`` from the ops that actually ran. A cache hit runs no op at all (a dict lookup).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.harness.counters.ops import gating_scope, mark_gating

__all__ = ["CompactMLP", "GatedMLP", "PromptGate", "SubnetCache", "kept_units", "layer_norm"]


def kept_units(keep: float, hidden: int) -> int:
    """Hidden units a block keeps at fraction ``keep``: ``round(keep * hidden)``, at least 1.

    Raises:
        ValueError: If ``keep`` is outside (0, 1].
    """
    if not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be a number > 0 and <= 1, got {keep!r}")
    return max(1, min(hidden, round(keep * hidden)))


def layer_norm(h: torch.Tensor) -> torch.Tensor:
    """Layer norm over the last dimension, without affine parameters (the next matrix absorbs them)."""
    return F.layer_norm(h, h.shape[-1:])


class PromptGate(nn.Module):
    """The light gate network: prompt (digit class) embedding -> one score per hidden unit per block.

    ``scores = W e_c + b``, with ``e_c`` a learned ``embed``-wide class embedding. Marked as gating,
    so every op it runs is attributed to gating overhead.
    """

    def __init__(self, classes: int, embed: int, blocks: int, hidden: int) -> None:
        super().__init__()
        self.blocks, self.hidden = blocks, hidden
        self.embed = nn.Embedding(classes, embed)
        self.score = nn.Linear(embed, blocks * hidden)
        mark_gating(self)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Scores ``(G, blocks, hidden)`` for ``labels`` ``(G,)``."""
        return self.score(self.embed(labels)).view(-1, self.blocks, self.hidden)


class CompactMLP(nn.Module):
    """The kept units of a :class:`GatedMLP` for one prompt, gathered into small dense weights.

    Per block ``l``: ``w1[l]`` ``(k, dim)``, ``b1[l]`` ``(k,)`` and ``w2t[l]`` ``(k, dim)`` (the second
    matrix, transposed). Forward per block, for ``h`` ``(B, dim)``::

        h = h + relu(layer_norm(h) @ w1[l].T + b1[l]) @ w2t[l]

    i.e. four ops (layer norm, addmm, in-place relu, addmm that adds the residual for free).
    """

    def __init__(self, w1: list[torch.Tensor], b1: list[torch.Tensor], w2t: list[torch.Tensor],
                 index: torch.Tensor) -> None:
        super().__init__()
        self.w1, self.b1, self.w2t = w1, b1, w2t
        #: Kept unit indices ``(blocks, k)``, for inspection and tests.
        self.index = index

    @property
    def kept(self) -> int:
        return self.w1[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the gathered tensors (weights, biases, indices)."""
        return sum(t.numel() * t.element_size() for t in (*self.w1, *self.b1, *self.w2t, self.index))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, dim)`` -> ``(B, dim)``."""
        for w1, b1, w2t in zip(self.w1, self.b1, self.w2t, strict=True):
            a = torch.addmm(b1, layer_norm(h), w1.t()).relu_()  # (B, k)
            h = torch.addmm(h, a, w2t)  # (B, dim): residual + a @ w2t
        return h


class GatedMLP(nn.Module):
    """``blocks`` residual MLP blocks (``dim`` -> ``hidden`` -> ``dim``) whose hidden units are gated.

    Parameters: ``w1`` ``(blocks, hidden, dim)``, ``b1`` ``(blocks, hidden)`` and ``w2t``
    ``(blocks, hidden, dim)``: row ``j`` of ``w2t[l]`` is unit ``j``'s output weights, so gathering
    the kept units of both matrices reads contiguous rows.
    """

    def __init__(self, dim: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.dim, self.hidden, self.blocks = dim, hidden, blocks
        self.w1 = nn.Parameter(torch.randn(blocks, hidden, dim) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(blocks, hidden))
        # NB: small output weights so each residual block starts close to the identity; the scale
        # does not depend on the kept fraction, so sparse sub-networks start even closer to it.
        self.w2t = nn.Parameter(torch.randn(blocks, hidden, dim) * (0.1 / math.sqrt(hidden)))

    # -- reference (dense) execution -------------------------------------------------------------
    def forward_masked(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Dense computation with a 0/1 ``mask`` ``(B, blocks, hidden)`` on the hidden units (None: all).

        The reference the compact path must match, and the dense layer ``bench_sparsity`` times.
        """
        for b in range(self.blocks):
            a = torch.addmm(self.b1[b], layer_norm(h), self.w1[b].t()).relu_()  # (B, hidden)
            if mask is not None:
                a = a * mask[:, b]
            h = torch.addmm(h, a, self.w2t[b])  # (B, dim)
        return h

    # -- sparse execution ------------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, index: torch.Tensor) -> CompactMLP:
        """Gather the kept units ``index`` ``(blocks, k)`` into a :class:`CompactMLP`.

        Runs inside :func:`gating_scope`: the gather's bytes are gating overhead.
        """
        if index.shape[0] != self.blocks:
            raise ValueError(f"index must have one row per block ({self.blocks}), got shape {tuple(index.shape)}")
        with gating_scope():
            w1 = [self.w1[b].index_select(0, index[b]) for b in range(self.blocks)]  # (k, dim) each
            b1 = [self.b1[b].index_select(0, index[b]) for b in range(self.blocks)]  # (k,) each
            w2t = [self.w2t[b].index_select(0, index[b]) for b in range(self.blocks)]  # (k, dim) each
            index = index.clone()
        return CompactMLP(w1, b1, w2t, index)



class SubnetCache:
    """Compact sub-networks by key (digits: (prompt label, keep); pipelines: the prompt), LRU, bounded in bytes.

    Each generator owns its cache (no global state). Values must have an ``nbytes`` attribute.
    ``get(key, build)`` returns the cached value (a hit) or builds and keeps it (a miss); with
    ``limit_bytes`` the least recently used entries are evicted once the held bytes exceed it
    (never the entry just added).
    """

    def __init__(self, limit_bytes: int | None = None) -> None:
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.limit_bytes = limit_bytes
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def lookup(self, key: Hashable) -> Any:
        """The cached value (counted as a hit, and made most recent), or ``None`` (nothing counted)."""
        value = self._entries.get(key)
        if value is not None:
            self.hits += 1
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Keep a value built after a miss (counted as a miss), evicting old entries over the limit."""
        self.misses += 1
        self._entries[key] = value
        while self.limit_bytes is not None and self.nbytes > self.limit_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == key:
                break
            del self._entries[oldest]
            self.evictions += 1

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        value = self.lookup(key)
        if value is None:
            value = build()
            self.put(key, value)
        return value

    def clear(self) -> None:
        """Forget every entry and the counts (the next use of each key is cold)."""
        self._entries.clear()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self._entries.values())

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self._entries),
                "bytes": self.nbytes, "limit_bytes": self.limit_bytes,
                "keys": [list(k) if isinstance(k, tuple) else k for k in sorted(self._entries, key=repr)]}
