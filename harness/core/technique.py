"""Techniques as transforms of a denoiser, and the sampler base class that runs their hooks.

A *model* (:mod:`~un0_bench.harness.core.model`, with its plan, run state and layers) is a diffusers
denoiser (``UNet2DModel``, ``UNet2DConditionModel``, a transformer) plus the number of sampling
steps and what each technique did to it (its *layers*). A :class:`Technique`
takes a model and changes it in place: it may replace modules inside the denoiser (int8 layers),
cast it (bf16), zero its weights (magnitude pruning), replace it (a shipped pruned or distilled
network), or hook every denoiser call (DeepCache, contextual sparsity). It returns a :class:`Layer`
that says what it changed and receives the sampler's hooks.

The sampler belongs to the backbone (the digits DDIM loop; a pipeline's own ``__call__``). Every
backbone's sampler derives from :class:`DenoiserGenerator`, which calls the same hooks everywhere:

* ``before_batch`` / ``after_batch`` around each batch (one sampler run);
* ``before_call`` / ``after_call`` around every denoiser call (``Run.call_index`` counts them);
* a ``denoise_step`` phase around every denoiser call, and the phases layers add (``gate``).

A stack (``sd-distilled+int8``) is a base model and techniques applied left to right; a stack that
cannot work is refused by :meth:`Technique.check` from a :class:`Plan`, before anything loads.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.core.model import Layer, Model, Plan, Run
from un0_bench.harness.core.spec import Param
from un0_bench.harness.errors import StackError

if TYPE_CHECKING:
    from un0_bench.harness.core.backbone import Backbone


class Technique(abc.ABC):
    """A transform of a denoiser, written once for every backbone.

    Attributes:
        name: Registry name, as written in a stack (``sd+int8``); its one-line summary is the registry's.
        params: Spec parameters with their types, defaults and ranges.
        denoisers: Denoiser classes it applies to (empty: any).
        stacking: Where it may stand in a stack, for ``un0-bench list``.
    """

    name: str = ""
    params: dict[str, Param] = {}
    denoisers: tuple[str, ...] = ()
    stacking: str = "anywhere after the base"

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        """Refuse (``StackError`` with the reason) a plan this technique cannot apply to.

        Called before any model loads; update ``plan`` (steps, weights) when the technique changes them.
        """
        if plan.denoiser is None:
            raise StackError(f"{self.name} transforms a diffusion denoiser; {plan.layers[0]} has none "
                             "(techniques stack on sd and its derived models)")
        if self.denoisers and plan.denoiser not in self.denoisers:
            raise StackError(f"{self.name} applies to {' and '.join(self.denoisers)} denoisers; "
                             f"{'+'.join(plan.layers)} on {plan.backbone_kind} has a {plan.denoiser}")

    def require_first(self, plan: Plan, why: str) -> None:
        """Refuse a plan where this technique would not come right after the base (``why`` says why)."""
        if len(plan.layers) != 1:
            raise StackError(f"{self.name} {why}, so it must come right after {plan.layers[0]}, not after "
                             f"{'+'.join(plan.layers)}")

    def check_weights(self, backbone: Backbone, **params: Any) -> list[Path]:
        """Open every weights file :meth:`apply` will load (header, metadata, config; not the tensors).

        Called before the first cell is measured; returns the files' paths (their hashes key resume).
        Raise ``CheckpointError`` naming the file. Default: the technique loads no file.
        """
        return []

    @abc.abstractmethod
    def apply(self, model: Model, backbone: Backbone, **params: Any) -> Layer:
        """Change ``model`` in place and return the layer describing the change."""


def denoiser_dtype(denoiser: nn.Module) -> str:
    """``"int8"`` when the denoiser holds int8 weights, else its parameters' dtype (``"bfloat16"``).

    int8 weights are buffers of the project's int8 layers, or parameters of a quantisation library's
    tensor subclass (torchao's ``Int8Tensor`` keeps its int8 values in ``qdata``).
    """
    if any(b.dtype == torch.int8 for name, b in denoiser.named_buffers() if name.endswith("weight")):
        return "int8"
    if any(getattr(p, "qdata", p).dtype == torch.int8 for p in denoiser.parameters()):
        return "int8"
    return str(next(denoiser.parameters()).dtype).removeprefix("torch.")


class DenoiserGenerator(Generator):
    """A backbone's sampler around a :class:`Model`: calls every layer's hooks, emits phases.

    Subclasses implement :meth:`sample_batch` (one sampler run) and :meth:`check_prompts`; the
    hooks, phases, caches and description of the layers live here, so they are the same on every
    backbone. The denoiser hooks are registered ahead of any hook a technique registered itself,
    so a ``denoise_step`` window covers everything the call does (casts included) and
    ``before_call`` work (un0's gate) runs before the window opens.
    """

    technique = "diffusion"

    def __init__(self, model: Model) -> None:
        self.model = model
        self.run: Run | None = None
        self._handles = [
            model.denoiser.register_forward_pre_hook(self._pre_call, with_kwargs=True, prepend=True),
            model.denoiser.register_forward_hook(self._post_call, always_call=True),
        ]

    @property
    def layers(self) -> list[Layer]:
        return self.model.layers

    def close(self) -> None:
        """Remove this sampler's hooks from the denoiser (a calibration sampler is thrown away)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        run = self.run
        if run is None:
            return
        run.timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        for layer in self.layers:
            layer.before_call(run, args, kwargs)
        self.emit("begin", "denoise_step")

    def _post_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        run = self.run
        if run is None:
            return
        try:
            for layer in reversed(self.layers):
                layer.after_call(run)
        finally:
            self.emit("end", "denoise_step")
            run.call_index += 1

    @abc.abstractmethod
    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        """Refuse bad prompts before any work."""

    @abc.abstractmethod
    def sample_batch(self, prompts: tuple[str, ...], seed: int, first: int) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] (float32, CPU) of one sampler run (image k: seed + first + k)."""

    @contextlib.contextmanager
    def batch(self, prompts: tuple[str, ...]) -> Iterator[Run]:
        """One sampler run's state, with the layers' batch hooks around it (even if it raises)."""
        self.run = run = Run(prompts=tuple(prompts), emit=self.emit)
        try:
            for layer in self.layers:
                layer.before_batch(run)
            yield run
        finally:
            try:
                for layer in reversed(self.layers):
                    layer.after_batch(run)
            finally:
                self.run = None

    def run_batch(self, prompts: tuple[str, ...], seed: int, first: int) -> torch.Tensor:
        """One sampler run with the layers' batch hooks around it."""
        with self.batch(tuple(prompts)):
            return self.sample_batch(tuple(prompts), seed, first)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.check_prompts(request.prompts)
        out = [self.run_batch(prompts, request.seed, first) for first, prompts in request.batches()]
        return GenerationResult(images=torch.cat(out), prompts=request.prompts, info={"steps": self.model.steps})

    def phases(self) -> tuple[str, ...]:
        added = [p for layer in self.layers for p in layer.phases]
        return (*self.backbone_phases()[0], *dict.fromkeys(added), "denoise_step", *self.backbone_phases()[1])

    def backbone_phases(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The sampler's own phases before and after the denoising loop (text encoder; VAE decode)."""
        return (), ()

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.reset_cache()

    def cache_stats(self) -> dict[str, Any] | None:
        stats = [s for layer in self.layers if (s := layer.cache_stats()) is not None]
        return stats[0] if len(stats) == 1 else ({"layers": stats} if stats else None)

    def describe(self) -> dict[str, Any]:
        d = self.model.denoiser
        techniques = [layer.technique for layer in self.layers]
        return {
            "technique": "+".join(techniques) if techniques else self.technique,
            "steps": self.model.steps,
            "denoiser_class": type(d).__name__,
            # Weights held as buffers count too: int8 layers keep their weights and biases that way.
            "parameters": sum(p.numel() for p in d.parameters())
            + sum(b.numel() for name, b in d.named_buffers() if name.rpartition(".")[2] in ("weight", "bias")),
            "dtype": denoiser_dtype(d),
            "layers": [layer.describe() for layer in self.layers],
            "phases": list(self.phases()),
        }

    def derivation(self) -> dict[str, Any] | None:
        return self.model.derivation or None
