"""``contextual`` (``un0`` on ``diffusers:PATH``): Un-0's neuron gating inside a pretrained denoiser.

Contextual sparsity of the denoiser's feed-forward layers, without training: per prompt a small
predictor picks the top ``keep`` fraction of hidden units of each layer; those rows and columns are
gathered into compact weights, cached per prompt. Built in three steps when the technique is applied:

1. calibration: the pipeline runs on calibration prompts while every feed-forward layer's hidden
   activations are recorded; a unit's importance for a prompt is its mean ``|h_j|`` times the norm
   of its output column (how much it adds to the layer's output);
2. a :class:`RidgeGate` is fitted to predict those importances from the prompt's mean text
   embedding (contextual sparsity, as Deja Vu does for LLMs, here per prompt);
3. every ``FeedForward`` is replaced by a :class:`GatedFeedForward`.

At generation, before the first denoiser call of a batch, a ``gate`` phase scores the batch's new
prompts, keeps the top ``keep`` fraction of units per layer and gathers them into compact weights,
kept in the same :class:`~un0_bench.un0_impl.sparse.SubnetCache` the digits ``un0`` uses (LRU, bounded
in bytes). The gate is marked and the gathers run in ``gating_scope()``, so the counters attribute
them to gating.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model, Plan, Run
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.counters.ops import gating_scope, mark_gating
from un0_bench.harness.errors import StackError, UserError
from un0_bench.un0_impl.sparse import SubnetCache

KEEP = Param(float, 0.1, "fraction of feed-forward hidden units kept per prompt", low=0.0, high=1.0, low_open=True)

#: Seed of the latents calibration runs start from (fixed, so gates are reproducible).
CALIBRATION_SEED = 1_000_000
#: Calibration prompts per pipeline call.
CALIBRATION_BATCH = 4

#: Gated-linear activations: ``proj`` gives ``[a, g]`` and the hidden unit is ``a * act(g)``.
_GLU_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"GEGLU": F.gelu, "SwiGLU": F.silu}


class FeedForwardSpec:
    """The pieces of one diffusers ``FeedForward``: input projection, activation, output projection."""

    def __init__(self, path: str, ff: nn.Module) -> None:
        act_module = ff.net[0]
        kind = type(act_module).__name__
        outs = [m for m in ff.net if isinstance(m, nn.Linear)]
        proj = getattr(act_module, "proj", None)
        if not outs or not isinstance(proj, nn.Linear):
            raise UserError(f"un0: feed-forward {path} has no input and output projection to gate")
        self.path, self.kind, self.act_module, self.proj, self.out = path, kind, act_module, proj, outs[-1]
        self.glu = kind in _GLU_ACTS
        if self.glu:
            self.act: Callable[[torch.Tensor], torch.Tensor] = _GLU_ACTS[kind]
        elif kind == "GELU":
            approximate = act_module.approximate
            self.act = lambda x: F.gelu(x, approximate=approximate)
        elif kind == "ApproximateGELU":
            self.act = lambda x: x * torch.sigmoid(1.702 * x)
        elif kind == "LinearActivation":
            self.act = act_module.activation
        else:
            raise UserError(f"un0: feed-forward {path} uses {kind}; supported activations: GEGLU, SwiGLU, GELU, "
                            "ApproximateGELU, LinearActivation")
        self.inner = self.out.in_features  # hidden units


class CompactFeedForward:
    """The kept hidden units of one feed-forward layer, gathered into dense compact weights.

    Built inside the gate (its gathers are gating work); called inside the denoiser (compute).
    """

    def __init__(self, spec: FeedForwardSpec, keep: torch.Tensor) -> None:
        rows = torch.cat([keep, keep + spec.inner]) if spec.glu else keep  # GLU: [a-rows, g-rows]
        self.spec = spec
        self.w_in = spec.proj.weight.index_select(0, rows)  # (k or 2k, D)
        self.b_in = None if spec.proj.bias is None else spec.proj.bias.index_select(0, rows)
        self.w_out = spec.out.weight.index_select(1, keep)  # (D_out, k)
        self.b_out = spec.out.bias  # whole: one per output channel, shared with the dense layer
        self.units = int(keep.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.w_in, self.b_in)  # (..., k) or (..., 2k)
        if self.spec.glu:
            a, g = h.chunk(2, dim=-1)
            h = a * self.spec.act(g)
        else:
            h = self.spec.act(h)
        return F.linear(h, self.w_out, self.b_out)  # (..., D_out)

    @property
    def nbytes(self) -> int:
        ts = [self.w_in, self.w_out] + ([self.b_in] if self.b_in is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


class PromptSubnet(list):
    """One prompt's compact feed-forward layers (one per gated layer), as the cache holds them."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self)


class GatedFeedForward(nn.Module):
    """Replaces a ``FeedForward``: each batch row runs through its prompt's compact sub-network.

    Rows map to prompts as diffusers lays out classifier-free guidance (``[uncond; cond]``): row
    ``r`` of a batch of ``B`` prompts belongs to prompt ``r % B``, so both halves of an image use
    the keep-set of its prompt.
    """

    def __init__(self, dense: nn.Module, spec: FeedForwardSpec) -> None:
        super().__init__()
        self.dense = dense  # kept so the weights stay in the module tree; never called
        self.spec = spec
        self.active: list[CompactFeedForward] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        subs = self.active
        if subs is None:
            raise RuntimeError(f"gated feed-forward {self.spec.path} called before the gate chose its units")
        b, rows = len(subs), hidden_states.shape[0]
        if b == 1:
            return subs[0](hidden_states)
        if rows % b:
            raise RuntimeError(f"{rows} rows for {b} prompts in {self.spec.path}")
        with gating_scope():  # the split and merge are caused by gating
            out = hidden_states.new_empty(*hidden_states.shape[:-1], self.spec.out.out_features)
        for p, sub in enumerate(subs):
            y = sub(hidden_states[p::b])
            with gating_scope():
                out[p::b] = y
        return out


class RidgeGate(nn.Module):
    """Per-prompt scores of every feed-forward hidden unit, from the prompt's mean text embedding.

    Kernel ridge regression with a linear kernel, in closed form, fitted on ``P`` calibration
    prompts: ``score_l(f) = mean_l + k(f) A_l`` with ``k(f) = X_c (f - mu)`` the similarities of the
    prompt to the (centred) calibration prompts. So the gate is two small linear maps: one shared
    ``D -> P`` and one ``P -> U_l`` per layer. (The digits ``un0`` learns its gate instead:
    :class:`~un0_bench.un0_impl.sparse.PromptGate`.)
    """

    def __init__(self, features: torch.Tensor, targets: list[torch.Tensor], ridge: float) -> None:
        super().__init__()
        x = features.double()  # (P, D)
        mu = x.mean(0)
        xc = x - mu
        p = x.shape[0]
        kernel = xc @ xc.T  # (P, P)
        lam = ridge * float(kernel.diagonal().mean()) + 1e-12
        system = kernel + lam * torch.eye(p, dtype=torch.float64)
        self.project = nn.Linear(x.shape[1], p)
        self.project.weight.data = xc.float()
        self.project.bias.data = (-(xc @ mu)).float()
        self.heads = nn.ModuleList()
        for y in targets:  # (P, U_l)
            y = y.double()
            mean = y.mean(0)
            a = torch.linalg.solve(system, y - mean)  # (P, U_l)
            head = nn.Linear(p, y.shape[1])
            head.weight.data = a.T.float().contiguous()
            head.bias.data = mean.float()
            self.heads.append(head)
        mark_gating(self)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        z = self.project(features.float())  # (N, P)
        return [head(z) for head in self.heads]  # [(N, U_l)]


def prompt_features(run: Run, kwargs: dict) -> torch.Tensor:
    """Mean text embedding of each prompt of the batch ``(B, D)``, from the denoiser's conditioning."""
    ehs = kwargs.get("encoder_hidden_states")
    if not isinstance(ehs, torch.Tensor):
        raise UserError("un0: the denoiser is not called with encoder_hidden_states; cannot read the prompt")
    b, rows = len(run.prompts), ehs.shape[0]
    if rows not in (b, 2 * b):
        raise RuntimeError(f"un0: {rows} conditioning rows for {b} prompts")
    cond = ehs[rows - b:]  # (B, T, D): the conditional half under classifier-free guidance
    return cond.float().mean(dim=1)


class _Recorder(Layer):
    """Calibration only: keeps each batch's prompt features at its first denoiser call."""

    def __init__(self) -> None:
        super().__init__("calibration", {})
        self.features: list[torch.Tensor] = []

    def before_call(self, run: Run, args: tuple, kwargs: dict) -> None:
        if run.call_index == 0:
            self.features.append(prompt_features(run, kwargs).cpu())  # (B, D)


class ContextualLayer(Layer):
    """The gate phase and the per-prompt sub-networks of every gated feed-forward layer."""

    phases = ("gate",)

    def __init__(self, params: dict[str, Any], changes: dict[str, Any], specs: list[FeedForwardSpec],
                 keep_units: list[int], gate: RidgeGate, gated: list[GatedFeedForward], cache_bytes: int) -> None:
        super().__init__("contextual", params, changes)
        self.specs, self.keep_units, self.gate, self.gated = specs, keep_units, gate, gated
        self.cache = SubnetCache(limit_bytes=cache_bytes)

    def before_call(self, run: Run, args: tuple, kwargs: dict) -> None:
        if run.call_index != 0:
            return
        with run.phase("gate"), gating_scope():
            prompts = run.prompts
            subnets: dict[str, PromptSubnet] = {}
            new: list[int] = []
            pending: set[str] = set()
            for i, p in enumerate(prompts):
                if p in subnets or p in pending:  # repeated within the batch: gated once
                    self.cache.hits += 1
                    continue
                found = self.cache.lookup(p)  # a hit is counted here
                if found is not None:
                    subnets[p] = found
                else:
                    new.append(i)
                    pending.add(p)
            if new:
                scores = self.gate(prompt_features(run, kwargs)[new])  # [(M, U_l)]
                made = [PromptSubnet() for _ in new]
                for spec, k, s in zip(self.specs, self.keep_units, scores, strict=True):
                    keep = s.topk(k, dim=-1).indices.sort(dim=-1).values  # (M, k), ascending for locality
                    for j in range(len(new)):
                        made[j].append(CompactFeedForward(spec, keep[j]))
                for j, i in enumerate(new):
                    self.cache.put(prompts[i], made[j])
                    subnets[prompts[i]] = made[j]
            for index, layer in enumerate(self.gated):
                layer.active = [subnets[p][index] for p in prompts]

    def after_batch(self, run: Run) -> None:
        for layer in self.gated:
            layer.active = None

    def reset_cache(self) -> None:
        self.cache.clear()

    def cache_stats(self) -> dict[str, Any]:
        stats = self.cache.stats()
        stats.pop("keys")  # prompts can be long; entries and bytes say enough
        return stats




class ContextualSparsity(Technique):
    """``contextual:keep=F`` (``un0`` on pipelines): per-prompt gated feed-forward units."""

    name = "contextual"
    stacking = "right after sd (its gates are calibrated on the pipeline's own activations)"
    params = {"keep": KEEP}

    def __init__(self, calibration_prompts: Sequence[str] | None = None, calibration_steps: int | None = None,
                 ridge: float = 1.0, cache_bytes: int = 2**30, meter_calibration: bool = True) -> None:
        self.calibration_prompts = calibration_prompts
        self.calibration_steps = calibration_steps
        self.ridge, self.cache_bytes, self.meter_calibration = ridge, cache_bytes, meter_calibration

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        super().check(plan, params)
        self.require_first(plan, "calibrates its gates on the pipeline's own feed-forward activations")

    def apply(self, model: Model, backbone: Backbone, keep: float = 0.1) -> Layer:
        from un0_bench.backbones.pipeline import CALIBRATION_PROMPTS
        from un0_bench.backbones.pipeline_parts import feed_forward_layers

        denoiser = model.denoiser
        layers = feed_forward_layers(denoiser)
        specs = [FeedForwardSpec(path, ff) for path, ff in layers]
        if not specs:
            raise StackError(f"un0: the {type(denoiser).__name__} has no feed-forward layers to gate")
        keep_units = [max(1, round(keep * s.inner)) for s in specs]
        prompts = tuple(self.calibration_prompts or CALIBRATION_PROMPTS)
        for p in prompts:
            backbone.check_prompt(p)
        steps = min(model.steps, 10) if self.calibration_steps is None else self.calibration_steps
        if steps < 1:
            raise UserError(f"calibration_steps must be an integer >= 1, got {steps!r}")
        features, targets, energy, duration_s = self._calibrate(model, backbone, specs, prompts, steps)
        gate = RidgeGate(features, targets, self.ridge).to(next(denoiser.parameters()).device)
        gated = []
        for spec, (path, ff) in zip(specs, layers, strict=True):
            g = GatedFeedForward(ff, spec)
            parent, _, attr = path.rpartition(".")
            setattr(denoiser.get_submodule(parent) if parent else denoiser, attr, g)
            gated.append(g)
        calibration = {
            "kind": "un0-pipeline-calibration",
            "command": f"no separate command: calibrated when un0 is built on {backbone.name}",
            "energy": energy,
            "duration_s": duration_s,
            "calibration": {"prompts": len(prompts), "steps": steps, "seed": CALIBRATION_SEED, "ridge": self.ridge,
                            "features": "mean over tokens of the conditional encoder_hidden_states",
                            "importance": "mean |hidden unit| x norm of its output column"},
            "gate_parameters": sum(p.numel() for p in gate.parameters()),
        }
        model.derivation = calibration
        ff_params = sum(p.numel() for s in specs for p in (s.proj.weight, s.out.weight))
        total = sum(p.numel() for p in denoiser.parameters()) - ff_params  # dense copies are kept, never run
        changes = {
            "keep": keep,
            "gated_layers": len(specs),
            "activations": sorted({s.kind for s in specs}),
            "hidden_units": sum(s.inner for s in specs),
            "kept_units": sum(keep_units),
            "feed_forward_share_of_weights": ff_params / total if total else 0.0,
            "gate": "kernel ridge on the mean text embedding, fitted on calibration prompts (no training)",
            "gate_parameters": calibration["gate_parameters"],
            "cache_limit_bytes": self.cache_bytes,
        }
        return ContextualLayer({"keep": keep}, changes, specs, keep_units, gate, gated, self.cache_bytes)

    def _calibrate(self, model: Model, backbone: Backbone, specs: list[FeedForwardSpec], prompts: tuple[str, ...],
                   steps: int) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any], float]:
        """Run the pipeline on the calibration prompts, recording prompt features and unit activations."""
        from un0_bench.harness.weights.derivation import metered_training

        n = len(prompts)
        sums = [torch.zeros(n, s.inner, dtype=torch.float64) for s in specs]
        offset = [0]
        recorder = _Recorder()
        batch = CALIBRATION_BATCH

        def record(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                h = out.detach().float().abs()
                per_row = h.reshape(h.shape[0], -1, h.shape[-1]).mean(dim=1)  # (R, U)
                b = min(batch, n - offset[0])
                per_prompt = per_row.reshape(-1, b, per_row.shape[-1]).sum(dim=0)  # (B, U): CFG halves summed
                sums[index][offset[0] : offset[0] + b] += per_prompt.double().cpu()
            return hook

        saved_steps, saved_layers = model.steps, model.layers
        model.steps, model.layers = steps, [*model.layers, recorder]
        sampler = backbone.sampler(model)
        handles = [s.act_module.register_forward_hook(record(i)) for i, s in enumerate(specs)]

        def run_all() -> None:
            for first in range(0, n, batch):
                offset[0] = first
                sampler.run_batch(prompts[first : first + batch], CALIBRATION_SEED, first)
            for h in handles:  # the counted batch below must not add to the importances
                h.remove()

        t0 = time.perf_counter()
        energy: dict[str, Any] = {}
        try:
            if self.meter_calibration:
                with metered_training() as metered:
                    run_all()
                energy = metered.by_meter
                energy["proxy"] = self._count_one_batch(sampler, prompts[:batch], n, batch)
            else:
                run_all()
        finally:
            for h in handles:
                h.remove()
            sampler.close()
            model.steps, model.layers = saved_steps, saved_layers
        duration_s = time.perf_counter() - t0
        targets = []
        for spec, s in zip(specs, sums, strict=True):
            column_norm = spec.out.weight.detach().float().norm(dim=0).double().cpu()  # (U,)
            targets.append(s * column_norm)  # (P, U): expected size of each unit's contribution
        return torch.cat(recorder.features), targets, energy, duration_s

    @staticmethod
    def _count_one_batch(sampler: Any, prompts: tuple[str, ...], n: int, batch: int) -> dict[str, Any]:
        """Proxy energy of calibration: one counted batch x the number of batches."""
        from un0_bench.harness.counters.ops import OpCounter
        from un0_bench.harness.meters.proxy import DEFAULT_PROFILE, proxy_energy

        recorder = sampler.layers[-1]
        kept = len(recorder.features)
        with OpCounter() as counter:
            sampler.run_batch(prompts, CALIBRATION_SEED, 0)
        del recorder.features[kept:]  # the counted batch repeats the first: do not fit on it twice
        counts = counter.counts(images=len(prompts))
        batches = math.ceil(n / batch)
        return {"status": "ok", "energy_j": proxy_energy(counts, DEFAULT_PROFILE).total_j * batches,
                "flops": counts.flops() * batches, "profile": DEFAULT_PROFILE,
                "note": f"counted cost of one calibration batch x {batches} batches"}
