"""``un0``: the design brief's Un-0. A neuron-gated sparse generator that runs in one to four steps.

The network maps noise straight to an image (no denoising loop), distilled from the teacher's
deterministic 50-step DDIM map (same noise in, same image out). Per step ``k``::

    h = W_z z + W_x x_k + bias[class, k]        # (B, dim); W_x x_k only for k > 0
    h = GatedMLP blocks (hidden units kept per prompt)
    x_{k+1} = W_out layer_norm(h) + b_out       # (B, 256): the image, refined step by step

A prompt (a digit) selects its hidden units through :class:`~un0_impl.sparse.PromptGate`; the kept
rows are gathered once per (prompt, keep) into a compact sub-network (:class:`Un0Subnet`), cached,
and reused for every image and step of that prompt. A batch with mixed prompts is grouped by prompt:
each group runs its own compact sub-network with ordinary dense matmuls.

``un0-bench train un0`` (``training/un0.py``) reproduces the shipped weights
(``backbones/weights/digits/un0.safetensors``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.backbones.digits import IMAGE_SHAPE, WEIGHTS_DIR, prompt_labels, to_unit
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator, image_noise
from un0_bench.harness.core.spec import Param, takes
from un0_bench.harness.counters.ops import gating_scope, mark_gating
from un0_bench.harness.weights.quantize import quantize_per_channel
from un0_bench.un0_impl.sparse import CompactMLP, GatedMLP, PromptGate, SubnetCache, kept_units, layer_norm

#: Architecture of the shipped model.
UN0_CONFIG: dict[str, Any] = {
    "image_dim": 256,  # 1 x 16 x 16, flattened
    "dim": 128,  # residual stream width
    "hidden": 5120,  # gated hidden units per block
    "blocks": 2,
    "embed": 16,  # prompt (class) embedding width
    "classes": 10,
    "max_steps": 4,
}

#: The keep fractions the shipped model's gate and units were trained at, with their loss weights (one
#: model for all of them: top-k sets are nested, the top 1% of a prompt's units are inside its top 10%).
KEEP_LEVELS: list[list[float]] = [[0.1, 1.0], [0.01, 0.3], [0.001, 0.1]]
UN0_FILE = WEIGHTS_DIR / "un0.safetensors"

KEEP = Param(float, 0.1, "fraction of hidden units kept per block (trained at 0.001 to 0.1)", low=0.0,
             high=1.0, low_open=True)
STEPS = Param(int, 1, "refinement steps (noise -> image in 1 to 4 steps)", low=1, high=UN0_CONFIG["max_steps"])

#: How the shipped file stores the big matrices, to keep it near 3.5 MB (5.9 MB in float16): the
#: gated matrices as int8 with one float32 scale per unit row (``<name>.scale``), the gate's scores in
#: float16. They are loaded back to float32 and the model is evaluated and benchmarked from the stored
#: values. Measured on the float16 file (quality n=1,000, two seeds): int8 rows moved FID by <= 0.0004.
INT8_STORED = ("mlp.w1", "mlp.w2t")
FP16_STORED = ("gate.score.weight",)


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to save: :data:`INT8_STORED` as int8 rows plus scales, :data:`FP16_STORED` as float16."""
    packed = {}
    for k, v in state.items():
        if k in INT8_STORED:
            q, scale = quantize_per_channel(v.reshape(-1, v.shape[-1]))  # one scale per unit row
            packed[k] = q.reshape(v.shape)
            packed[k + ".scale"] = scale.reshape(*v.shape[:-1], 1)
        else:
            packed[k] = v.half() if k in FP16_STORED else v
        packed[k] = packed[k].contiguous().clone()
    return packed


def unpack_state(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict :func:`pack_state`'s tensors stand for."""
    return {k: v.float() * packed[k + ".scale"] if k in INT8_STORED else v.float()
            for k, v in packed.items() if not k.endswith(".scale")}


class Un0Net(nn.Module):
    """The trainable network (see the module docstring). All shapes come from :data:`UN0_CONFIG`."""

    def __init__(self, image_dim: int, dim: int, hidden: int, blocks: int, embed: int, classes: int,
                 max_steps: int) -> None:
        super().__init__()
        self.image_dim, self.dim, self.hidden, self.blocks, self.max_steps = image_dim, dim, hidden, blocks, max_steps
        self.gate = PromptGate(classes, embed, blocks, hidden)
        # Prompt embedding -> residual-stream bias. Like the gate, it runs once per prompt (folded
        # into the compact sub-network's step biases), so it is marked as gating too.
        self.cond = mark_gating(nn.Linear(embed, dim))
        self.step_bias = nn.Parameter(torch.zeros(max_steps, dim))
        self.z_in = nn.Linear(image_dim, dim)
        self.x_in = nn.Linear(image_dim, dim, bias=False)
        self.mlp = GatedMLP(dim, hidden, blocks)
        self.out = nn.Linear(dim, image_dim)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Un0Net:
        return cls(**config)

    # -- per-prompt preparation (gating) ---------------------------------------------------------
    def prompt_bias(self, labels: torch.Tensor) -> torch.Tensor:
        """``(G, max_steps, dim)``: input bias + prompt bias + step bias, for labels ``(G,)``."""
        emb = self.gate.embed(labels)  # (G, embed)
        return (self.cond(emb) + self.z_in.bias)[:, None, :] + self.step_bias  # (G, max_steps, dim)

    @torch.no_grad()
    def prepare(self, label: int, keep: float) -> Un0Subnet:
        """Gate, select and gather the compact sub-network of one prompt (the cold path).

        Everything here runs in :func:`gating_scope`: gate scores, top-k, gather, bias folding.
        """
        k = kept_units(keep, self.hidden)
        with gating_scope():
            labels = torch.tensor([label])
            scores = self.gate(labels)[0]  # (blocks, hidden)
            # Sorted so the compact weights keep the units in index order (the result of the sums
            # does not depend on it, but a stable layout makes cached entries comparable).
            index = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # (blocks, k)
            bias = self.prompt_bias(labels)[0]  # (max_steps, dim)
        return Un0Subnet(self, self.mlp.gather(index), bias)

    # -- dense reference (masked) ----------------------------------------------------------------
    def keep_mask(self, labels: torch.Tensor, keep: float) -> torch.Tensor:
        """0/1 mask ``(B, blocks, hidden)`` of each image's kept units."""
        k = kept_units(keep, self.hidden)
        index = self.gate(labels).topk(k, dim=-1).indices  # (B, blocks, k)
        return torch.zeros(len(labels), self.blocks, self.hidden).scatter_(-1, index, 1.0)

    def forward_masked(self, z: torch.Tensor, labels: torch.Tensor, keep: float, steps: int) -> torch.Tensor:
        """The same generator computed densely with masked hidden units: ``z`` ``(B, 256)`` -> ``(B, 256)``.

        The reference the compact path must equal; it multiplies every unit, so it is not how
        ``un0`` runs.
        """
        mask = self.keep_mask(labels, keep)
        bias = self.prompt_bias(labels)  # (B, max_steps, dim)
        zp = F.linear(z, self.z_in.weight)
        x = None
        for k in range(steps):
            h = zp + bias[:, k] if x is None else zp + bias[:, k] + self.x_in(x)
            x = self.out(layer_norm(self.mlp.forward_masked(h, mask)))
        return x


class Un0Subnet(nn.Module):
    """One prompt's compact sub-network: shared input/output layers + gathered MLP + folded biases.

    Holds references to the shared dense layers (no copy) and owns the gathered tensors.
    """

    def __init__(self, net: Un0Net, mlp: CompactMLP, bias: torch.Tensor) -> None:
        super().__init__()
        self.w_z, self.w_x = net.z_in.weight, net.x_in.weight  # (dim, 256) each, shared
        self.w_out, self.b_out = net.out.weight, net.out.bias  # (256, dim), (256,), shared
        self.mlp = mlp
        self.bias = bias  # (max_steps, dim)

    @property
    def kept(self) -> int:
        return self.mlp.kept

    @property
    def nbytes(self) -> int:
        """Bytes this prompt's cache entry holds beyond the shared weights."""
        return self.mlp.nbytes + self.bias.numel() * self.bias.element_size()

    def forward(self, z: torch.Tensor, steps: int,
                step_phase: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> torch.Tensor:
        """``z`` ``(B, 256)`` noise -> ``(B, 256)`` image in model space (about [-1, 1]).

        ``step_phase()`` wraps each refinement step (the generator's ``refine_step`` phase window).
        """
        zp = z @ self.w_z.t()  # (B, dim), computed once for all steps
        x = None
        for k in range(steps):
            with step_phase():
                h = zp + self.bias[k] if x is None else torch.addmm(zp + self.bias[k], x, self.w_x.t())
                x = torch.addmm(self.b_out, layer_norm(self.mlp(h)), self.w_out.t())  # (B, 256)
        return x


class Un0Generator(Generator):
    """The ``un0`` generator: gated sparse sub-networks per prompt, cached, 1 to 4 steps."""

    technique = "gated-sparse"

    def __init__(self, net: Un0Net, keep: float = 0.1, steps: int = 1, metadata: dict[str, Any] | None = None
                 ) -> None:
        self.kept = kept_units(keep, net.hidden)  # refuses keep outside (0, 1]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= net.max_steps:
            raise ValueError(f"steps must be an integer >= 1 and <= {net.max_steps}, got {steps!r}")
        self.net = net.eval().requires_grad_(False)
        self.keep, self.steps = float(keep), steps
        self.metadata = metadata or {}
        self.cache = SubnetCache()

    def subnet(self, label: int) -> Un0Subnet:
        """The compact sub-network of ``label`` at this generator's keep fraction (cached)."""
        return self.cache.get((label, self.keep), lambda: self.net.prepare(label, self.keep))

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> GenerationResult:
        labels = prompt_labels(request.prompts)  # refuses bad prompts before any work
        hits, misses = self.cache.hits, self.cache.misses
        out = torch.empty(len(labels), self.net.image_dim)  # (N, 256)
        for first, prompts in request.batches():
            z = image_noise(request.seed, first, len(prompts), IMAGE_SHAPE).flatten(1)  # (b, 256)
            batch_labels = labels[first : first + len(prompts)].tolist()
            # Group the batch by prompt: each group runs its own compact sub-network with dense
            # matmuls (per-image keep-sets through gather + bmm are many times slower than dense).
            groups: dict[int, list[int]] = {}
            for i, label in enumerate(batch_labels):
                groups.setdefault(label, []).append(i)
            with self.phase("gate"):  # the gate and the gather on a miss; a dict lookup on a hit
                subs = {label: self.subnet(label) for label in groups}
            for label, rows in groups.items():
                sub = subs[label]
                if len(rows) == len(prompts):
                    out[first : first + len(prompts)] = sub(z, self.steps, self._step_phase)
                else:
                    idx = torch.tensor(rows)
                    out.index_copy_(0, idx + first, sub(z.index_select(0, idx), self.steps, self._step_phase))
        images = to_unit(out.view(len(labels), *IMAGE_SHAPE))
        info = {"cache_hits": self.cache.hits - hits, "cache_misses": self.cache.misses - misses,
                "steps": self.steps, "kept_units_per_block": self.kept}
        return GenerationResult(images=images, prompts=request.prompts, info=info)

    def _step_phase(self) -> AbstractContextManager[None]:
        return self.phase("refine_step")

    def phases(self) -> tuple[str, ...]:
        return ("gate", "refine_step")

    def reset_cache(self) -> None:
        self.cache.clear()

    def cache_stats(self) -> dict[str, Any]:
        return self.cache.stats()

    def describe(self) -> dict[str, Any]:
        n = self.net
        shared = sum(p.numel() for m in (n.z_in, n.x_in, n.out) for p in m.parameters())
        per_block = self.kept * (2 * n.dim + 1)
        return {
            "technique": self.technique,
            "backbone": "digits",
            "keep": self.keep,
            "steps": self.steps,
            "dim": n.dim,
            "hidden_per_block": n.hidden,
            "blocks": n.blocks,
            "kept_units_per_block": self.kept,
            "parameters": sum(p.numel() for p in n.parameters()),
            "active_parameters_per_image": shared + n.blocks * per_block,
            "dtype": "float32",
            "weights_storage": "int8 rows + scales for the gated matrices, float16 for the gate (both loaded as "
                               "float32), float32 otherwise",
            "cache": "compact sub-network per (prompt label, keep)",
            **self.trained_range_note(),
        }

    def trained_range_note(self) -> dict[str, Any]:
        """``trained_keeps``, and a ``caveat`` when this keep lies outside them (accepted, but untrained).

        Above the largest trained keep the extra units were never trained to cooperate: at keep 1 the
        shipped model's error on the teacher's pairs is ~100x that at keep 0.1 (``fit`` in its metadata).
        """
        levels = self.metadata.get("train", {}).get("keep_levels", KEEP_LEVELS)
        keeps = sorted(keep for keep, _ in levels)
        note: dict[str, Any] = {"trained_keeps": keeps}
        if not keeps[0] <= self.keep <= keeps[-1]:
            note["caveat"] = (f"keep={self.keep:g} is outside the keep fractions the gate and units were trained "
                              f"at ({keeps[0]:g} to {keeps[-1]:g}); expect poor quality")
        return note

    def derivation(self) -> dict[str, Any] | None:
        return self.metadata or None


def load_un0(path: Path = UN0_FILE) -> tuple[Un0Net, dict[str, Any]]:
    """The trained network (float32) and its metadata. Refuses a file made for another config."""
    from un0_bench.harness.weights.checkpoints import load_checkpoint, load_into, unpacked

    state, meta = load_checkpoint(path, expected_config=UN0_CONFIG)
    net = Un0Net.from_config(UN0_CONFIG)
    load_into(net, unpacked(unpack_state, state, path), path)
    return net.eval().requires_grad_(False), meta


@takes(keep=KEEP, steps=STEPS)
def build(backbone: Backbone, keep: float, steps: int) -> Generator:
    """``un0``, ``un0:keep=0.01``, ``un0:keep=0.1,steps=2``."""
    net, meta = load_un0(backbone.weights("un0"))
    return Un0Generator(net, keep=keep, steps=steps, metadata=meta)


def _check_weights(backbone: Backbone, **params: Any) -> list[Path]:
    from un0_bench.harness.weights.checkpoints import check_checkpoint

    check_checkpoint(backbone.weights("un0"), expected_config=UN0_CONFIG)
    return [backbone.weights("un0")]


build.check_weights = _check_weights  # type: ignore[attr-defined]
