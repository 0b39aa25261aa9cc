"""``un0-bench train un0``: the gated sparse student of ``un0_impl/gated.py``, distilled from the teacher's map.

The network learns the teacher's deterministic 50-step DDIM map (same noise in, same image out) from
:func:`~un0_bench.training.pairs.teacher_pairs`, at every keep fraction of
:data:`~un0_bench.un0_impl.gated.KEEP_LEVELS` at once, with a straight-through top-k gate
(:func:`forward_train`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from un0_bench.backbones.teacher import load_teacher
from un0_bench.harness.weights.checkpoints import save_checkpoint
from un0_bench.harness.weights.derivation import metered_training
from un0_bench.training.loop import ema_update, run_steps, train_command, training_metadata
from un0_bench.training.pairs import teacher_pairs, teacher_pairs_energy
from un0_bench.un0_impl.gated import (
    FP16_STORED,
    INT8_STORED,
    KEEP_LEVELS,
    UN0_CONFIG,
    UN0_FILE,
    Un0Net,
    pack_state,
    unpack_state,
)
from un0_bench.un0_impl.sparse import GatedMLP, kept_units, layer_norm

#: The shipped training run. ``keep_levels``: (keep, loss weight) pairs the gate is trained at (the
#: model's :data:`~un0_bench.un0_impl.gated.KEEP_LEVELS`).
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 2500,
    "per_class": 32,  # batch = 10 classes x 32 pairs, grouped by class as at inference
    "lr": 2e-3,
    "gate_lr": 2e-2,
    "weight_decay": 0.0,
    "dropout": 0.0,  # on hidden activations, training only
    "unroll": 4,  # steps unrolled (and supervised) in training
    "ema_decay": 0.998,
    "keep_levels": KEEP_LEVELS,
    "band": 1.5,  # candidate units per kept unit for the straight-through gradient
    "tau": 0.05,  # temperature of the surrogate sigmoid, in units of the scores
    "seed": 0,
    # 16,384 teacher pairs: with 4,096 the student overfit (held-out FID 1.3x sd's, and more
    # steps did not help); with 16,384 it reaches 1.11x at keep 0.1, one step (make bench, n=1,000).
    "pairs": 16384,
}


def gather_band(mlp: GatedMLP, index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Differentiable gather of ``mlp``'s candidate units ``index`` ``(G, blocks, band)``.

    Returns per block ``(w1, b1, w2t)``: ``(G, band, dim)``, ``(G, band)``, ``(G, band, dim)``.
    Gather once per training step and slice prefixes for narrower bands: each gather's backward
    scatters into a full-size gradient. (Per-block tensors, not one stacked tensor, so the
    backward does not zero-fill a stacked gradient for every use of one block.)
    """
    return [(mlp.w1[b][index[:, b]], mlp.b1[b][index[:, b]], mlp.w2t[b][index[:, b]])
            for b in range(mlp.blocks)]


def forward_band(h: torch.Tensor, band: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 mask: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """A gated MLP's grouped sparse computation over a band of candidate units.

    Args:
        h: ``(G, B, dim)``: ``G`` prompt groups of ``B`` rows each.
        band: Per block ``(w1, b1, w2t)`` from :func:`gather_band` (or a prefix of its band).
        mask: ``(G, blocks, band)`` multiplier of each candidate's activation (the
            straight-through top-k mask: 1 for kept units and 0 for the others in the forward
            pass, with a surrogate gradient to the gate scores).
        dropout: Dropout probability on the hidden activations (a regulariser; 0 at inference).

    Returns:
        ``(G, B, dim)``.
    """
    for b, (w1, b1, w2t) in enumerate(band):
        a = torch.baddbmm(b1[:, None, :], layer_norm(h), w1.transpose(1, 2)).relu()  # (G, B, band)
        if dropout:
            a = F.dropout(a, dropout)
        h = torch.baddbmm(h, a * mask[:, b, None, :], w2t)  # (G, B, dim)
    return h


def forward_train(net: Un0Net, z: torch.Tensor, labels: torch.Tensor, keeps: list[float], steps: int, band: float,
                  tau: float, dropout: float = 0.0) -> dict[float, list[torch.Tensor]]:
    """``net``'s images after each of ``steps`` steps at each keep fraction, for ``z`` ``(G, B, 256)``.

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
    ks = [kept_units(keep, net.hidden) for keep in keeps]
    widths = [min(net.hidden, max(k + 1, round(band * k))) for k in ks]
    scores = net.gate(labels)  # (G, blocks, hidden)
    top = scores.topk(max(widths), dim=-1)  # values and indices (G, blocks, width), sorted by score
    gathered = gather_band(net.mlp, top.indices)
    bias = net.prompt_bias(labels)  # (G, max_steps, dim)
    zp = F.linear(z, net.z_in.weight)  # (G, B, dim)
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
            h = zp + bias[:, None, s] if x is None else zp + bias[:, None, s] + net.x_in(x)
            x = net.out(layer_norm(forward_band(h, band_k, mask, dropout)))  # (G, B, 256)
            outs.append(x)
        result[keep] = outs
    return result


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
    cfg = dict(TRAIN_DEFAULTS)
    steps = cfg["steps"] if steps is None else steps
    seed = cfg["seed"] if seed is None else seed
    out = UN0_FILE if out is None else Path(out)
    config = copy.deepcopy(UN0_CONFIG if config is None else config)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    teacher = teacher_meta = None
    if pairs is None:
        pairs = teacher_pairs(cfg["pairs"])
        teacher, teacher_meta = load_teacher()
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
        outs = forward_train(net, z, class_labels, keeps, unroll, cfg["band"], cfg["tau"], cfg["dropout"])
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
        energy.add_parent("teacher_pairs", teacher_pairs_energy(cfg["pairs"], teacher=teacher))
    meta = training_metadata(
        kind="un0-gated", config=config, energy=energy, losses=losses,
        command=train_command("un0", steps=steps, seed=seed), train={**cfg, "steps": steps, "seed": seed},
        extra={
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
