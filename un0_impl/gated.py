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

``un0-bench train un0`` reproduces the shipped weights (``backbones/weights/digits/un0.safetensors``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.backbones.digits import IMAGE_SHAPE, WEIGHTS_DIR, prompt_labels, to_unit
from un0_bench.harness.backbone import Backbone
from un0_bench.harness.counters.ops import gating_scope, mark_gating
from un0_bench.harness.generator import GenerationRequest, GenerationResult, Generator, image_noise
from un0_bench.harness.spec import Param, takes
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

#: The shipped training run. ``keep_levels``: (keep, loss weight) pairs the gate is trained at, one
#: model for all of them (top-k sets are nested: the top 1% of a prompt's units are inside its top 10%).
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 2500,
    "per_class": 32,  # batch = 10 classes x 32 pairs, grouped by class as at inference
    "lr": 2e-3,
    "gate_lr": 2e-2,
    "weight_decay": 0.0,
    "dropout": 0.0,  # on hidden activations, training only
    "unroll": 4,  # steps unrolled (and supervised) in training
    "ema_decay": 0.998,
    "keep_levels": [[0.1, 1.0], [0.01, 0.3], [0.001, 0.1]],
    "band": 1.5,  # candidate units per kept unit for the straight-through gradient
    "tau": 0.05,  # temperature of the surrogate sigmoid, in units of the scores
    "seed": 0,
    # 16,384 teacher pairs: with 4,096 the student overfit (held-out FID 1.3x sd's, and more
    # steps did not help); with 16,384 it reaches 1.11x at keep 0.1, one step (make bench, n=1,000).
    "pairs": 16384,
}
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
            scale = (v.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
            packed[k] = torch.round(v / scale).clamp(-127, 127).to(torch.int8)
            packed[k + ".scale"] = scale.float()
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

    # -- training: class-grouped bands, straight-through top-k ------------------------------------
    def forward_train(self, z: torch.Tensor, labels: torch.Tensor, keeps: list[float], steps: int, band: float,
                      tau: float, dropout: float = 0.0) -> dict[float, list[torch.Tensor]]:
        """Images after each of ``steps`` steps at each keep fraction, for ``z`` ``(G, B, 256)``.

        ``z`` is grouped by prompt, one group per label of ``labels`` ``(G,)``, as at inference.

        The gate is trained with a straight-through top-k. Why: the forward pass must be exactly
        what inference runs (hard top-k, kept units x 1, others x 0), so no soft-to-hard gap
        appears at deployment; the backward pass needs a signal telling the gate which units are
        worth keeping. Each group computes a *band* of candidates, its top ``band x k`` units by
        score; the mask is ``hard + s - stop_grad(s)`` with ``s = sigmoid((score - threshold) / tau)``
        and the threshold halfway between the k-th and (k+1)-th score. So the forward is hard top-k,
        and the gradient reaching a candidate's score is its activation's first-order effect on the
        loss: kept units that hurt sink below the threshold, runners-up that would help rise above
        it. Restricting the surrogate to the band (not all units, as a dense straight-through
        estimator would) keeps training sparse too: it costs about ``band x keep`` of a dense step.
        The top-k sets of different keep fractions are nested (prefixes of the same ranking), so
        one gather of the widest band serves them all.
        """
        ks = [kept_units(keep, self.hidden) for keep in keeps]
        widths = [min(self.hidden, max(k + 1, round(band * k))) for k in ks]
        scores = self.gate(labels)  # (G, blocks, hidden)
        top = scores.topk(max(widths), dim=-1)  # values and indices (G, blocks, width), sorted by score
        gathered = self.mlp.gather_band(top.indices)
        bias = self.prompt_bias(labels)  # (G, max_steps, dim)
        zp = F.linear(z, self.z_in.weight)  # (G, B, dim)
        result: dict[float, list[torch.Tensor]] = {}
        for keep, k, width in zip(keeps, ks, widths, strict=True):
            values = top.values[..., :width]
            if width > k:
                threshold = 0.5 * (values[..., k - 1] + values[..., k])  # (G, blocks)
            else:
                threshold = values[..., k - 1] - tau
            soft = torch.sigmoid((values - threshold.detach()[..., None]) / tau)  # (G, blocks, width)
            hard = (torch.arange(width) < k).to(soft.dtype)  # (width,): the top k of the sorted band
            mask = hard + soft - soft.detach()
            band_k = [tuple(t[:, :width] for t in block) for block in gathered]
            x, outs = None, []
            for s in range(steps):
                h = zp + bias[:, None, s] if x is None else zp + bias[:, None, s] + self.x_in(x)
                x = self.out(layer_norm(self.mlp.forward_band(h, band_k, mask, dropout)))  # (G, B, 256)
                outs.append(x)
            result[keep] = outs
        return result


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
        levels = self.metadata.get("train", TRAIN_DEFAULTS)["keep_levels"]
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
    from un0_bench.harness.checkpoints import load_checkpoint, load_into, unpacked

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
    from un0_bench.harness.checkpoints import check_checkpoint

    check_checkpoint(backbone.weights("un0"), expected_config=UN0_CONFIG)
    return [backbone.weights("un0")]


build.check_weights = _check_weights  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _teacher_pairs_cost(n: int, steps: int = 50, images: int = 2) -> dict[str, Any]:
    """Counted proxy cost of making ``n`` teacher pairs: one counted ``images``-image run, scaled."""
    from un0_bench.backbones.ddim import ddim_sample
    from un0_bench.backbones.teacher import load_teacher
    from un0_bench.harness.counters.ops import OpCounter
    from un0_bench.harness.meters.proxy import DEFAULT_PROFILE, proxy_energy

    unet, _ = load_teacher()
    noise = image_noise(0, 0, images, IMAGE_SHAPE)
    with OpCounter() as c:
        ddim_sample(unet, steps, noise, torch.arange(images))
    counts = c.counts(images=images)
    scale = n / images
    return {"proxy": {"status": "ok", "energy_j": proxy_energy(counts).total_j * scale,
                      "flops": counts.flops() * scale, "profile": DEFAULT_PROFILE,
                      "note": f"teacher_pairs({n}, steps={steps}): counted cost of {images} images x {scale:g}; "
                              "the pairs are cached on disk and shared by every student"}}


def train_un0(steps: int | None = None, seed: int | None = None, out: Path | None = None, *,
              config: dict[str, Any] | None = None,
              pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Distil the teacher's noise -> image map into the gated sparse student and save it.

    Args:
        steps: Optimizer steps (default: the shipped run's).
        seed: Seed of initialisation and batches (default: the shipped run's).
        out: Weights file to write (default: the shipped ``un0.safetensors``).
        config: Architecture (default :data:`UN0_CONFIG`); tests pass a tiny one.
        pairs: ``(noise, labels, images)`` to learn from (default: ``teacher_pairs(TRAIN_DEFAULTS["pairs"])``).

    Returns:
        The metadata written beside the weights.
    """
    from un0_bench.harness.checkpoints import save_checkpoint
    from un0_bench.harness.training import ema_update, metered_training, run_steps, training_metadata

    cfg = dict(TRAIN_DEFAULTS)
    steps = cfg["steps"] if steps is None else steps
    seed = cfg["seed"] if seed is None else seed
    out = UN0_FILE if out is None else Path(out)
    config = copy.deepcopy(UN0_CONFIG if config is None else config)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    teacher_meta = None
    if pairs is None:
        from un0_bench.backbones.teacher import load_teacher, teacher_pairs

        pairs = teacher_pairs(cfg["pairs"])
        _, teacher_meta = load_teacher()
    noise, labels, images = pairs
    z_all = noise.flatten(1)  # (N, 256)
    y_all = images.flatten(1)  # (N, 256)
    classes = config["classes"]
    by_class = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    if any(len(ix) == 0 for ix in by_class):
        raise ValueError("the training pairs must contain every class")

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Un0Net.from_config(config).train()
    ema = copy.deepcopy(net).requires_grad_(False)
    gate_params = list(net.gate.parameters())
    other = [p for n_, p in net.named_parameters() if not n_.startswith("gate.")]
    opt = torch.optim.AdamW([{"params": other, "lr": cfg["lr"], "weight_decay": cfg["weight_decay"]},
                             {"params": gate_params, "lr": cfg["gate_lr"], "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    class_labels = torch.arange(classes)
    unroll = min(cfg["unroll"], config["max_steps"])

    def train_step() -> float:
        # One row of per_class pairs for every class: the batch is grouped by prompt, as at inference.
        pick = torch.stack([ix[torch.randint(0, len(ix), (cfg["per_class"],), generator=g)] for ix in by_class])
        z, y = z_all[pick], y_all[pick]  # (classes, per_class, 256) each
        keeps = [keep for keep, _ in cfg["keep_levels"]]
        outs = net.forward_train(z, class_labels, keeps, unroll, cfg["band"], cfg["tau"], cfg["dropout"])
        loss = torch.zeros(())
        for keep, weight in cfg["keep_levels"]:
            # Every step is supervised, so the same weights serve steps=1..max_steps.
            loss = loss + weight * sum(F.mse_loss(x, y) for x in outs[keep]) / len(outs[keep])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def ema_step(step: int) -> None:
        # Warm-up of the EMA decay: early averages follow the fast-moving weights more closely.
        ema_update(ema, net, min(cfg["ema_decay"], (1 + step) / (10 + step)))

    with metered_training() as energy:
        losses = run_steps(train_step, steps, "train un0", scheduler=sched, after_step=ema_step)
    state = pack_state(ema.state_dict())
    ema.load_state_dict(unpack_state(state))  # report the fit of the weights as shipped
    fit = _fit_report(ema, z_all, y_all, labels)
    # Count one more training step (forward, backward, optimizer) for the proxy figure; it changes
    # only the raw weights, not the EMA snapshot saved above.
    energy.count_proxy(train_step, classes * cfg["per_class"], steps)
    if teacher_meta is not None:
        energy.add_parent("teacher", teacher_meta)
        energy.add_parent("teacher_pairs", {"energy": _teacher_pairs_cost(cfg["pairs"])})
    meta = training_metadata(
        kind="un0-gated", config=config, energy=energy,
        extra={
            "command": f"un0-bench train un0 --steps {steps} --seed {seed}",
            "train": {**cfg, "steps": steps, "seed": seed},
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "fit": fit,
            "storage": {**{k: "int8, float32 scale per row" for k in INT8_STORED},
                        **{k: "float16" for k in FP16_STORED}},
            "parameters": sum(p.numel() for p in ema.parameters()),
        },
    )
    save_checkpoint(out, state, meta)
    return meta


def _warmup_cosine(steps: int, warmup: float = 0.05) -> Any:
    """Learning-rate factor: linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    import math

    n_warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - n_warm) / max(1, steps - n_warm))))

    return factor


@torch.no_grad()
def _fit_report(net: Un0Net, z: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Mean squared error to the teacher's images on the training pairs, per keep and step count."""
    net.eval()
    out: dict[str, Any] = {}
    for keep in (1.0, 0.1, 0.01, 0.001):
        for steps in range(1, net.max_steps + 1):
            x = net.forward_masked(z[:1024], labels[:1024], keep, steps)
            out[f"keep={keep:g},steps={steps}"] = float(F.mse_loss(x.clamp(-1, 1), y[:1024]))
    return out
