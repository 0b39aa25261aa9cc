"""Typed registries for generators, backbones and meters: lazy entries, no duplicates, "did you mean".

This module is the one registration point for everything built in. Entries are ``"module:attr"``
strings, imported only when chosen, so listing generators does not import diffusers or pynvml.
Third-party generators register through the entry-point group ``un0_bench.generators``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from un0_bench.harness.errors import UserError


class UnknownNameError(UserError):
    """A name that is not registered; the message suggests close matches and lists what exists."""


@dataclass(frozen=True)
class Entry:
    name: str
    target: str | Callable[..., Any]
    summary: str = ""


class Registry:
    """Name -> lazily imported object, for one kind of thing."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._group = entry_point_group
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, target: str | Callable[..., Any], summary: str = "") -> None:
        """Add ``name``; refuses a name that is already registered."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"lazy target must be 'module:attr', got {target!r}")
        self._entries[name] = Entry(name, target, summary)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self._group):
            if ep.name not in self._entries:
                self._entries[ep.name] = Entry(ep.name, ep.value, f"(plugin from {ep.value})")

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries

    def names_in_order(self) -> list[str]:
        """Names in registration order (training targets depend on earlier ones)."""
        self._load_entry_points()
        return list(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def entry(self, name: str) -> Entry:
        self._load_entry_points()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def get(self, name: str) -> Any:
        """The registered object, importing its module on first use."""
        target = self.entry(name).target
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        return target

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(names)}"


GENERATORS = Registry("generator", entry_point_group="un0_bench.generators")
BACKBONES = Registry("backbone")
#: Generators on ``diffusers:PATH`` backbones: the same technique names, applied to a pipeline's denoiser.
PIPELINE_GENERATORS = Registry("generator on diffusers backbones")
METERS = Registry("meter")
#: ``un0-bench train TARGET``: functions taking ``steps``, ``seed``, ``out`` and returning metadata.
TRAINERS = Registry("training target")

# --- built-in entries: the one registration point ----------------------------------------------
GENERATORS.register("sd", "un0_bench.baselines.diffusion:build", "teacher diffusion model, DDIM, 50 steps, fp32")
GENERATORS.register("sd-bf16", "un0_bench.baselines.quantized:build_bf16", "teacher in bfloat16 weights and activations")
GENERATORS.register("sd-int8", "un0_bench.baselines.quantized:build_int8", "teacher with int8 convolutions and linears")
GENERATORS.register("sd-pruned", "un0_bench.baselines.pruned:build_structured", "50% channel-pruned teacher, fine-tuned")
GENERATORS.register("sd-pruned-unstructured", "un0_bench.baselines.pruned:build_unstructured",
                    "50% magnitude-pruned teacher, dense kernels (zeros still multiplied)")
GENERATORS.register("sd-distilled", "un0_bench.baselines.distilled:build", "few-step student distilled from the teacher")
GENERATORS.register("sd-cached", "un0_bench.baselines.cached:build", "DeepCache-style reuse of deep UNet features")
GENERATORS.register("noise", "un0_bench.baselines.references:build_noise", "uniform random images (quality floor)")
GENERATORS.register("real", "un0_bench.baselines.references:build_real", "held-out real digits (quality ceiling)")
GENERATORS.register("un0", "un0_bench.un0_impl.gated:build", "Un-0 reading 1: neuron-gated sparse few-step generator")
GENERATORS.register("un0-osc", "un0_bench.un0_impl.oscillator:build", "Un-0 reading 2: coupled Kuramoto oscillators")

BACKBONES.register("digits", "un0_bench.backbones.digits:DigitsBackbone", "sklearn handwritten digits, 16x16, CPU")
BACKBONES.register("diffusers", "un0_bench.backbones.pipeline:PipelineBackbone",
                   "diffusers:PATH, a text-to-image pipeline folder (Stable Diffusion and kin)")

_PT = "un0_bench.baselines.pipeline_techniques"
PIPELINE_GENERATORS.register("sd", f"{_PT}:build_sd", "the pipeline as loaded, its own scheduler")
PIPELINE_GENERATORS.register("sd-fp16", f"{_PT}:build_fp16", "denoiser in float16")
PIPELINE_GENERATORS.register("sd-bf16", f"{_PT}:build_bf16", "denoiser in bfloat16")
PIPELINE_GENERATORS.register("sd-int8", f"{_PT}:build_int8", "int8 linears (torchao on CUDA, torch._int_mm on CPU)")
PIPELINE_GENERATORS.register("sd-cached", f"{_PT}:build_cached", "DeepCache-style reuse of deep UNet blocks")
PIPELINE_GENERATORS.register("sd-pruned-unstructured", f"{_PT}:build_pruned_unstructured",
                             "magnitude pruning, dense kernels (zero savings)")
PIPELINE_GENERATORS.register("un0", f"{_PT}:build_un0", "contextual sparsity: gated feed-forward units per prompt")

METERS.register("wall", "un0_bench.harness.meters.wall:WallMeter", "monotonic clock; time only")
METERS.register("proxy", "un0_bench.harness.meters.proxy:ProxyMeter", "counted ops x energy per op (deterministic)")
METERS.register("rapl", "un0_bench.harness.meters.rapl:RaplMeter", "Linux powercap RAPL: CPU package and DRAM")
METERS.register("nvml", "un0_bench.harness.meters.nvml:NvmlMeter", "NVIDIA GPU energy counter via pynvml")
METERS.register("codecarbon", "un0_bench.harness.meters.codecarbon:CodecarbonMeter", "codecarbon offline tracker")

# Registration order is training order: later targets derive from earlier ones.
TRAINERS.register("teacher", "un0_bench.backbones.teacher:train_teacher", "the digits teacher UNet (everything derives from it)")
TRAINERS.register("judge", "un0_bench.backbones.judge:train_judge", "digits classifier: FID/KID features and accuracy")
TRAINERS.register("sd-int8", "un0_bench.baselines.quantized:calibrate_int8", "int8 scales calibrated on real digits")
TRAINERS.register("sd-pruned", "un0_bench.baselines.pruned:train_pruned", "channel pruning + fine-tuning")
TRAINERS.register("sd-distilled", "un0_bench.baselines.distilled:train_distilled", "few-step students (4 and 1 step)")
TRAINERS.register("un0", "un0_bench.un0_impl.gated:train_un0", "gated sparse Un-0 student")
TRAINERS.register("un0-osc", "un0_bench.un0_impl.oscillator:train_oscillator", "coupled-oscillator Un-0")
