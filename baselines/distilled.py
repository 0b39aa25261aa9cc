"""``sd-distilled``: the shipped few-step students of the teacher's 50-step DDIM map.

* **The student.** A ``UNet2DModel`` with the teacher's exact config, initialised from the teacher's
  weights and sampled by the backbone's DDIM loop at its own timesteps (:data:`SAMPLERS`, set in
  ``model.sampler["schedule"]``; the sampler stays the backbone's):

  - K = 4 keeps the teacher's noise prediction and steps at t = 900, 650, 400, 150 (then to the
    clean image). Measured on the *untrained* teacher (FID at n = 1000, judge features): the
    default ``"leading"`` spacing of ``sd:steps=4`` (750, 500, 250, 0) scores 0.74, because its last
    step at t = 0 changes almost nothing; 900, 650, 400, 150 scores 0.30. Starting at t = 999
    scores 0.28 untrained but cannot be fine-tuned: there sqrt(alpha_bar) = 5e-5, so the x0 a
    noise-predicting network implies lives in output differences of ~1e-4 that any weight update
    scrambles (fine-tuning it made FID worse, 0.36).
  - K = 1 predicts the clean image x0 directly from the noise at t = 999 (``"sample"``
    prediction): in one step there is nothing to refine, and x0 cannot be read from a noise
    prediction at t = 999 (see above).
* **The weights** are stored as int8 per output channel to keep each file near 1.1 MB
  (:func:`pack_int8`; the student computes in float32 on the unpacked weights, and every quality
  figure is measured on what ships).

The two students are separate files, ``sd-distilled-4.safetensors`` and ``sd-distilled-1.safetensors``,
each with its own metered training energy. How they are trained (``un0-bench train sd-distilled``):
``training/distilled.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Layer, Model, Plan
from un0_bench.harness.core.spec import Param
from un0_bench.harness.core.technique import Technique
from un0_bench.harness.errors import SpecError, StackError
from un0_bench.harness.weights.quantize import quantize_per_channel

#: Student step counts that are shipped (``sd-distilled:steps=K``); the first is the default.
SHIPPED_STEPS = (4, 1)
STEPS = Param(int, SHIPPED_STEPS[0], "student sampling steps: 4 or 1 (the shipped students)", low=1,
              high=max(SHIPPED_STEPS))

_PREDICTIONS = ("epsilon", "sample")


@dataclass(frozen=True)
class StudentSampler:
    """How a K-step student samples: DDIM (eta = 0) at ``timesteps``, then to alpha_bar = 1.

    Attributes:
        timesteps: Decreasing training timesteps (0..999) the K steps are taken at; the first one
            receives the pure noise.
        predictions: What the network outputs at each step: ``"epsilon"`` (the noise, as the
            teacher does) or ``"sample"`` (the clean image x0).
    """

    timesteps: tuple[int, ...]
    predictions: tuple[str, ...]

    def __post_init__(self) -> None:
        ts = self.timesteps
        if not ts or any(not 0 <= t <= 999 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
            raise ValueError(f"timesteps must be decreasing integers in 0..999, got {ts!r}")
        if len(self.predictions) != len(ts) or any(p not in _PREDICTIONS for p in self.predictions):
            raise ValueError(f"predictions must be one of {_PREDICTIONS} per timestep, got {self.predictions!r}")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def config(self) -> dict[str, Any]:
        return {"timesteps": list(self.timesteps), "predictions": list(self.predictions)}


#: The shipped students' samplers (see the module docstring for why they differ).
SAMPLERS: dict[int, StudentSampler] = {
    4: StudentSampler((900, 650, 400, 150), ("epsilon",) * 4),
    1: StudentSampler((999,), ("sample",)),
}


def student_config(steps: int, unet_config: dict[str, Any], schedule_config: dict[str, Any]) -> dict[str, Any]:
    """Config stored with (and checked against) a student's weights: network, noise schedule, sampler.

    ``unet_config`` and ``schedule_config`` are the teacher's (the backbone's
    :meth:`~un0_bench.harness.core.backbone.Backbone.denoiser_config` and ``schedule_config``).
    """
    return {"unet": copy.deepcopy(unet_config), "schedule": copy.deepcopy(schedule_config),
            "sampler": SAMPLERS[steps].config()}


#: Suffix of the per-output-channel scale stored beside each int8 weight tensor.
SCALE_SUFFIX = ".int8_scale"
#: How the students' weights are stored (recorded in their metadata).
STORAGE = "int8 per output channel (symmetric, max-abs) for tensors of 2+ dims, float32 otherwise"


def pack_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for storage: every float tensor of 2+ dims as int8 plus one float32 scale per output channel.

    This is storage only (it keeps a student near 1.1 MB instead of 4.5 MB): :func:`unpack_int8`
    restores float32 weights and the student computes in float32. Quality figures are measured on
    the unpacked weights, i.e. on exactly what ships.
    """
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if w.is_floating_point() and w.dim() >= 2:
            out[name], out[name + SCALE_SUFFIX] = quantize_per_channel(w)  # int8 (C_out, ...), (C_out,)
        else:
            out[name] = w
    return out


def unpack_int8(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_int8`: float32 weights (each within half a scale step of the original)."""
    state: dict[str, torch.Tensor] = {}
    for name, w in packed.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if w.dtype == torch.int8:
            scale = packed[name + SCALE_SUFFIX]  # (C_out,)
            w = (w.float().reshape(w.shape[0], -1) * scale[:, None]).reshape(w.shape)
        state[name] = w
    return state


class Distillation(Technique):
    """``distilled`` (``sd-distilled``, ``sd-distilled:steps=1``): the shipped few-step student.

    The denoiser's weights become the student's and the digits sampler runs the student's own
    timesteps and predictions (``model.sampler["schedule"]``).
    """

    name = "distilled"
    stacking = "right after sd at its default steps (its weights are a student of the teacher)"
    params = {"steps": STEPS}
    denoisers = ("UNet2DModel",)

    def check(self, plan: Plan, params: dict[str, Any]) -> None:
        super().check(plan, params)
        self.require_first(plan, "replaces the denoiser with a student distilled from the teacher")
        if plan.steps != plan.default_steps:
            raise StackError(f"distilled samples with the student's own steps; sd:steps={plan.steps} before it "
                             "would be ignored: write sd-distilled:steps=K (K = 4 or 1)")
        if params["steps"] not in SHIPPED_STEPS:
            valid = " or ".join(str(k) for k in SHIPPED_STEPS)
            raise SpecError(f"sd-distilled: steps={params['steps']} is not valid; steps must be {valid} "
                            "(a student is distilled for one step count, and only these are shipped)")
        plan.steps, plan.weights = params["steps"], f"sd-distilled-{params['steps']}"

    def check_weights(self, backbone: Backbone, steps: int = SHIPPED_STEPS[0]) -> list[Path]:
        from un0_bench.harness.weights.checkpoints import check_checkpoint

        check_checkpoint(backbone.weights(f"sd-distilled-{steps}"), expected_config=_expected_config(backbone, steps))
        return [backbone.weights(f"sd-distilled-{steps}")]

    def apply(self, model: Model, backbone: Backbone, steps: int = SHIPPED_STEPS[0]) -> Layer:
        from un0_bench.harness.weights.checkpoints import load_checkpoint, load_into, unpacked

        path = backbone.weights(f"sd-distilled-{steps}")
        state, meta = load_checkpoint(path, expected_config=_expected_config(backbone, steps))
        load_into(model.denoiser, unpacked(unpack_int8, state, path), path)
        sampler = SAMPLERS[steps]
        model.steps, model.derivation = steps, meta
        model.sampler["schedule"] = (sampler.timesteps, sampler.predictions)
        return Layer(self.name, {"steps": steps}, {
            "distilled_from": "teacher, 50-step DDIM",
            "timesteps": list(sampler.timesteps), "predictions": list(sampler.predictions),
            "weights_storage": STORAGE,
        })


def _expected_config(backbone: Backbone, steps: int) -> dict[str, Any]:
    """The config the backbone's ``sd-distilled-<steps>`` file must carry (its teacher's network and schedule)."""
    return student_config(steps, backbone.denoiser_config(), backbone.schedule_config())
