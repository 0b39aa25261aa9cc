"""``compiled``: the denoiser's forward through ``torch.compile`` (TorchInductor), as deployments run it.

The compiled function replaces the denoiser's ``forward`` on the instance, so the module's hooks
(the sampler's phases, other layers' hooks) still run eagerly around it. Compilation happens on the
first call (the warm-up's); its time is a one-time cost, recorded as ``compile_s`` (the first call
minus the second) next to the first call's time, and shown in the report beside the cold cache and
the amortised training. A later input shape recompiles; the warm-up runs the whole request, so
every shape of the measured windows is compiled before them.

NB: the op counter (a dispatch mode) cannot see inside Inductor's fused kernels, so the counting
pass runs the uncompiled forward: the same arithmetic, counted op by op. Fusion changes the bytes
really moved (fewer intermediate tensors), which the count does not see: ``bytes`` are the eager
graph's. Energy and time come from the meters, which time the compiled calls.
"""

from __future__ import annotations

import time
from typing import Any

from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.counters.ops import counting_active

#: torch.compile's modes ("default" is mode=None); the CUDA-graph modes need a GPU to matter.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODE = Param(str, "default", "torch.compile mode", choices=MODES)


class _CompiledLayer(Layer):
    def __init__(self, denoiser: Any, mode: str) -> None:
        import torch

        super().__init__("compiled", {"mode": mode}, {
            "library": "torch.compile (inductor)", "library_version": torch.__version__,
            "counted_as": "the uncompiled forward (the op counter cannot see inside compiled kernels)",
            "compile_s": None, "first_call_s": None,
        })
        self._eager = denoiser.forward  # the class's forward, or what an earlier layer put there
        self._compiled = torch.compile(self._eager, mode=None if mode == "default" else mode)
        self._calls: list[float] = []  # duration of the first two compiled calls
        denoiser.forward = self._forward

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if counting_active():
            return self._eager(*args, **kwargs)
        if len(self._calls) >= 2:
            return self._compiled(*args, **kwargs)
        start = time.perf_counter()
        out = self._compiled(*args, **kwargs)
        self._calls.append(time.perf_counter() - start)
        self.changes["first_call_s"] = self._calls[0]
        if len(self._calls) == 2:
            self.changes["compile_s"] = max(self._calls[0] - self._calls[1], 0.0)
        return out


class Compiled(Technique):
    """``compiled`` / ``compiled:mode=max-autotune-no-cudagraphs``."""

    name = "compiled"
    stacking = "last in a stack (it compiles the denoiser as the earlier layers left it)"
    params = {"mode": MODE}

    def apply(self, model: Model, backbone: Backbone, mode: str = "default") -> Layer:
        return _CompiledLayer(model.denoiser, mode)
