"""``sd-distilled``: few-step students distilled from the teacher's 50-step DDIM map.

How the students are made (``un0-bench train sd-distilled``):

* **What is learned.** The teacher's deterministic 50-step DDIM sampler is a map noise -> image.
  :func:`backbones.teacher.teacher_pairs` samples it once for 4,096 seeded noises (cached on disk and
  shared with the other students). A student must reproduce that map in K DDIM steps (K = 4 or 1).
* **The student.** A ``UNet2DModel`` with the teacher's exact config, initialised from the teacher's
  weights and sampled with deterministic DDIM at its own timesteps (:data:`SAMPLERS`):

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
* **The loss (on-policy targets).** Each iteration rolls a batch of noises through the student's
  own K-step sampler without gradients, collecting the K inputs it meets, and trains on all of them
  at once: at every step the target is the output that would make that step's x0 exactly the
  teacher's image for that noise (the image itself for x0 prediction; the matching noise for noise
  prediction, i.e. the teacher's own loss). DDIM with exact x0 at every step lands on the teacher's
  image, and training on the student's trajectory rather than the teacher's teaches the later steps
  to correct the earlier steps' errors. Each input costs one backward pass; nothing is
  backpropagated through the unrolled chain. For K = 1 this is plain regression noise -> image.
* The weights saved are an exponential moving average of the training weights, stored as int8 per
  output channel to keep each file near 1.1 MB (:func:`pack_int8`; the student computes in float32
  on the unpacked weights, and every quality figure is measured on what ships).

The two students are separate files, ``sd-distilled-4.safetensors`` and ``sd-distilled-1.safetensors``,
each with its own metered training energy; both include the teacher's training energy and the cost
of sampling the teacher pairs (counted and scaled, since the pairs usually come from the shared cache).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from un0_bench.backbones.ddim import ddim_sample, ddim_step
from un0_bench.backbones.digits import DEFAULT_STEPS, WEIGHTS_DIR
from un0_bench.harness.backbone import Backbone
from un0_bench.harness.checkpoints import file_sha256
from un0_bench.harness.errors import SpecError, StackError
from un0_bench.harness.model import Layer, Model, Plan
from un0_bench.harness.spec import Param
from un0_bench.harness.technique import Technique

#: Student step counts that are shipped (``sd-distilled:steps=K``); the first is the default.
SHIPPED_STEPS = (4, 1)
STEPS = Param(int, SHIPPED_STEPS[0], "student sampling steps: 4 or 1 (the shipped students)", low=1,
              high=max(SHIPPED_STEPS))

#: ``un0-bench train sd-distilled`` writes ``<stem>-4.safetensors`` and ``<stem>-1.safetensors`` beside this.
DEFAULT_OUT = WEIGHTS_DIR / "sd-distilled.safetensors"

#: How many teacher pairs to learn from; the same ``n`` as the other students, so the cache is shared.
PAIRS = 4096

#: Per-student training defaults. ``batch`` noises per iteration; the K-step student trains on
#: K x batch inputs per iteration (one per step of the roll-out).
TRAIN_DEFAULTS: dict[int, dict[str, Any]] = {
    4: {"iterations": 200, "batch": 32, "lr": 2e-4, "ema_decay": 0.98},
    1: {"iterations": 500, "batch": 128, "lr": 2e-3, "ema_decay": 0.98},
}
SEED = 0

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


def student_config(steps: int, unet_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config stored with (and checked against) a student's weights: network, noise schedule, sampler."""
    from un0_bench.backbones.teacher import SCHEDULER_CONFIG, UNET_CONFIG

    return {"unet": copy.deepcopy(unet_config or UNET_CONFIG), "schedule": copy.deepcopy(SCHEDULER_CONFIG),
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
            flat = w.detach().float().reshape(w.shape[0], -1)  # (C_out, rest)
            scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (C_out,)
            out[name] = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(w.shape)
            out[name + SCALE_SUFFIX] = scale
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


def student_path(out: Path, steps: int) -> Path:
    """``<out stem>-<steps>.safetensors`` in ``out``'s folder."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{steps}.safetensors")


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
        if plan.steps != DEFAULT_STEPS:
            raise StackError(f"distilled samples with the student's own steps; sd:steps={plan.steps} before it "
                             "would be ignored: write sd-distilled:steps=K (K = 4 or 1)")
        if params["steps"] not in SHIPPED_STEPS:
            valid = " or ".join(str(k) for k in SHIPPED_STEPS)
            raise SpecError(f"sd-distilled: steps={params['steps']} is not valid; steps must be {valid} "
                            "(a student is distilled for one step count, and only these are shipped)")
        plan.steps, plan.weights = params["steps"], f"sd-distilled-{params['steps']}"

    def check_weights(self, backbone: Backbone, steps: int = SHIPPED_STEPS[0]) -> list[Path]:
        from un0_bench.harness.checkpoints import check_checkpoint

        check_checkpoint(backbone.weights(f"sd-distilled-{steps}"), expected_config=student_config(steps))
        return [backbone.weights(f"sd-distilled-{steps}")]

    def apply(self, model: Model, backbone: Backbone, steps: int = SHIPPED_STEPS[0]) -> Layer:
        from un0_bench.harness.checkpoints import load_checkpoint, load_into, unpacked

        path = backbone.weights(f"sd-distilled-{steps}")
        state, meta = load_checkpoint(path, expected_config=student_config(steps))
        load_into(model.denoiser, unpacked(unpack_int8, state, path), path)
        sampler = SAMPLERS[steps]
        model.steps, model.derivation = steps, meta
        model.sampler["schedule"] = (sampler.timesteps, sampler.predictions)
        return Layer(self.name, {"steps": steps}, {
            "distilled_from": "teacher, 50-step DDIM",
            "timesteps": list(sampler.timesteps), "predictions": list(sampler.predictions),
            "weights_storage": STORAGE,
        })


# -- training -----------------------------------------------------------------------------------


def rollout_inputs(unet: torch.nn.Module, sampler: StudentSampler, alphas_cumprod: torch.Tensor,
                   noise: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs the student meets on its own K-step trajectory from ``noise`` ``(B, 1, H, W)``.

    Returns:
        ``x`` ``(K*B, 1, H, W)`` (step-major: all of step 0, then step 1, ...) and their timesteps ``(K*B,)``.
    """
    ts = sampler.timesteps
    xs = []
    x = noise
    with torch.no_grad():
        for i, t in enumerate(ts):
            xs.append(x)
            if i + 1 < len(ts):  # the last step's output is never an input
                out = unet(x, torch.full((x.shape[0],), t), class_labels=labels).sample
                x, _ = ddim_step(alphas_cumprod, x, out, t, ts[i + 1], sampler.predictions[i])
    steps = torch.tensor(ts).repeat_interleave(noise.shape[0])
    return torch.cat(xs), steps


def distill_loss(unet: torch.nn.Module, sampler: StudentSampler, alphas_cumprod: torch.Tensor,
                 x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Error of the student's outputs at step-major inputs ``x`` ``(K*B, 1, H, W)`` that should lead to ``target``.

    The target of each step is the output that makes its DDIM x0 exactly the teacher's image: the
    image itself where the step predicts x0, and the noise ``(x - sqrt(a) target) / sqrt(1 - a)``
    where it predicts noise (the teacher's own loss, i.e. the x0 error weighted by the
    signal-to-noise ratio). The K steps' errors are averaged with equal weight.
    """
    out = unet(x, t, class_labels=labels).sample  # (K*B, 1, H, W), one forward for all steps
    losses = []
    for i, (o, xi, ti, y) in enumerate(zip(*(v.chunk(sampler.steps) for v in (out, x, t, target)), strict=True)):
        if sampler.predictions[i] == "sample":
            losses.append(F.mse_loss(o, y))
        else:
            a = alphas_cumprod[ti].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            losses.append(F.mse_loss(o, (xi - a.sqrt() * y) / (1 - a).sqrt()))
    return torch.stack(losses).mean()


def distill_student(teacher: torch.nn.Module, pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    sampler: StudentSampler, iterations: int, batch: int, lr: float, ema_decay: float, seed: int
                    ) -> tuple[torch.nn.Module, Any, list[float]]:
    """Distil a student sampling with ``sampler`` from ``teacher`` on ``pairs`` (noise, labels, images).

    Returns:
        ``(ema_student, train_step, losses)``: the EMA weights to save, a closure running one more
        training iteration (for counting its cost), and the loss of every iteration.
    """
    from un0_bench.backbones.teacher import make_scheduler
    from un0_bench.harness.training import ema_update, one_cycle, run_steps

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    noise, labels, images = pairs
    k = sampler.steps
    alphas = make_scheduler().alphas_cumprod
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, iterations, 0.1)

    def train_step() -> float:
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        y = labels[idx]
        x, t = rollout_inputs(student, sampler, alphas, noise[idx], y)  # (K*B, 1, H, W), (K*B,)
        loss = distill_loss(student, sampler, alphas, x, t, y.repeat(k), images[idx].repeat(k, 1, 1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = run_steps(train_step, iterations, f"distil {k}-step student", scheduler=sched,
                       after_step=lambda _: ema_update(ema, student, ema_decay))
    return ema, train_step, losses


def teacher_pairs_energy(teacher: torch.nn.Module, n: int, steps: int = 50, batch: int = 16) -> dict[str, Any]:
    """What sampling ``n`` teacher pairs costs, as a parent-metadata dict for ``add_parent``.

    The pairs usually come from the shared on-disk cache, so their cost is not metered while a
    student trains. Instead one DDIM step of a ``batch``-image batch is counted (proxy) and one
    ``steps``-step batch is timed (wall), and both are scaled to ``n`` images.
    """
    from un0_bench.backbones.digits import IMAGE_SHAPE
    from un0_bench.harness.counters.ops import OpCounter
    from un0_bench.harness.generator import image_noise
    from un0_bench.harness.training import TrainingEnergy

    noise = image_noise(0, 0, batch, IMAGE_SHAPE)
    labels = torch.arange(batch) % 10
    t0 = time.perf_counter()
    ddim_sample(teacher, steps, noise, labels)
    batch_s = time.perf_counter() - t0
    # Every DDIM step runs the same network on the same shapes, so one counted step (network and
    # update) times the number of steps is the whole sampler's count.
    with OpCounter() as counter:
        ddim_sample(teacher, 1, noise, labels)
    batches = n / batch
    energy = TrainingEnergy()
    energy.add_proxy(counter.counts(images=batch), round(steps * batches))
    energy.by_meter["proxy"]["note"] = (f"counted one DDIM step of a {batch}-image batch x {steps} steps "
                                        f"x {batches:g} batches")
    energy.by_meter["wall"] = {"status": "ok", "energy_j": None, "duration_s": batch_s * batches,
                               "note": f"timed one {batch}-image {steps}-step batch x {batches:g} (estimate)"}
    return {"energy": energy.by_meter, "pairs": n, "teacher_steps": steps}


def train_distilled(steps: int | None = None, seed: int | None = None, out: Path | None = None) -> dict[str, Any]:
    """Train both students (4 and 1 steps) and write ``<out stem>-4`` and ``<out stem>-1`` weights.

    Args:
        steps: Training iterations for each student (default: :data:`TRAIN_DEFAULTS`).
        seed: Training seed (default 0).
        out: Base path; the students go to ``<stem>-4.safetensors`` and ``<stem>-1.safetensors``
            beside it (default: the shipped ``backbones/weights/digits/sd-distilled.safetensors``).

    Returns:
        The metadata of the 4-step student (the default ``sd-distilled``); each file's metadata
        is in its own JSON.
    """
    from un0_bench.backbones.teacher import TEACHER_FILE, load_teacher, teacher_pairs
    from un0_bench.harness.checkpoints import save_checkpoint
    from un0_bench.harness.training import metered_training, training_metadata

    seed = SEED if seed is None else seed
    out = DEFAULT_OUT if out is None else Path(out)
    teacher, teacher_meta = load_teacher(TEACHER_FILE)
    teacher_sha256 = file_sha256(TEACHER_FILE)
    pairs = teacher_pairs(PAIRS)
    pairs_meta = teacher_pairs_energy(teacher, PAIRS)
    command = (f"un0-bench train sd-distilled --seed {seed}" + (f" --steps {steps}" if steps is not None else "")
               + (f" --out {out}" if out != DEFAULT_OUT else ""))
    metas: dict[int, dict[str, Any]] = {}
    for k in SHIPPED_STEPS:
        hp = {**TRAIN_DEFAULTS[k], **({"iterations": steps} if steps is not None else {})}
        with metered_training() as energy:
            ema, train_step, losses = distill_student(teacher, pairs, SAMPLERS[k], seed=seed, **hp)
        # Count one more iteration (roll-out, forward, backward, optimizer) for the proxy figure; it
        # changes only the raw weights, not the EMA weights that are saved.
        energy.count_proxy(train_step, hp["batch"], hp["iterations"])
        energy.add_parent("teacher", teacher_meta)
        energy.add_parent("teacher_pairs", pairs_meta)
        meta = training_metadata(
            kind="digits-distilled-student", config=student_config(k, teacher_meta["config"]), energy=energy,
            extra={
                "command": command,
                "student_steps": k,
                "torch_threads": torch.get_num_threads(),
                "train": {**hp, "seed": seed, "pairs": PAIRS,
                          "loss": "on-policy: at every student step, the output that makes DDIM's x0 the "
                                  "teacher's image (noise or x0 MSE)"},
                "teacher_pairs": {"n": PAIRS, "teacher_steps": 50},
                "teacher_sha256": teacher_sha256,
                "storage": STORAGE,
                "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            },
        )
        save_checkpoint(student_path(out, k), pack_int8(ema.state_dict()), meta)
        metas[k] = meta
    return metas[SHIPPED_STEPS[0]]
