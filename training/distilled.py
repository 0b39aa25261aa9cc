"""``un0-bench train sd-distilled``: the few-step students of ``baselines/distilled.py``, distilled from the teacher.

* **What is learned.** The teacher's deterministic 50-step DDIM sampler is a map noise -> image.
  :func:`~un0_bench.training.pairs.teacher_pairs` samples it once for 4,096 seeded noises (cached on
  disk and shared with the other students). A student (initialised from the teacher's weights) must
  reproduce that map in K DDIM steps (K = 4 or 1, the samplers of ``baselines/distilled.py``).
* **The loss (on-policy targets).** Each iteration rolls a batch of noises through the student's
  own K-step sampler without gradients, collecting the K inputs it meets, and trains on all of them
  at once: at every step the target is the output that would make that step's x0 exactly the
  teacher's image for that noise (the image itself for x0 prediction; the matching noise for noise
  prediction, i.e. the teacher's own loss). DDIM with exact x0 at every step lands on the teacher's
  image, and training on the student's trajectory rather than the teacher's teaches the later steps
  to correct the earlier steps' errors. Each input costs one backward pass; nothing is
  backpropagated through the unrolled chain. For K = 1 this is plain regression noise -> image.
* The weights saved are an exponential moving average of the training weights, packed as int8 per
  output channel (``pack_int8``).

Each student's metadata includes the teacher's training energy and the cost of sampling the teacher
pairs (counted and scaled, since the pairs usually come from the shared cache).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from un0_bench.backbones.ddim import SCHEDULER_CONFIG, ddim_step, make_scheduler
from un0_bench.backbones.digits import WEIGHTS_DIR
from un0_bench.baselines.distilled import SAMPLERS, SHIPPED_STEPS, STORAGE, StudentSampler, pack_int8, student_config
from un0_bench.harness.weights.checkpoints import file_sha256, save_checkpoint
from un0_bench.harness.weights.derivation import metered_training
from un0_bench.training.loop import ema_update, one_cycle, run_steps, training_metadata
from un0_bench.training.pairs import teacher_pairs, teacher_pairs_energy

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


def student_path(out: Path, steps: int) -> Path:
    """``<out stem>-<steps>.safetensors`` in ``out``'s folder."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{steps}.safetensors")


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
    from un0_bench.backbones.teacher import TEACHER_FILE, load_teacher

    seed = SEED if seed is None else seed
    out = DEFAULT_OUT if out is None else Path(out)
    teacher, teacher_meta = load_teacher(TEACHER_FILE)
    teacher_sha256 = file_sha256(TEACHER_FILE)
    pairs = teacher_pairs(PAIRS)
    pairs_meta = teacher_pairs_energy(PAIRS, teacher=teacher)
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
            kind="digits-distilled-student", config=student_config(k, teacher_meta["config"], SCHEDULER_CONFIG),
            energy=energy, losses=losses,
            extra={
                "command": command,
                "student_steps": k,
                "torch_threads": torch.get_num_threads(),
                "train": {**hp, "seed": seed, "pairs": PAIRS,
                          "loss": "on-policy: at every student step, the output that makes DDIM's x0 the "
                                  "teacher's image (noise or x0 MSE)"},
                "teacher_pairs": {"n": pairs_meta["pairs"], "teacher_steps": pairs_meta["teacher_steps"]},
                "teacher_sha256": teacher_sha256,
                "storage": STORAGE,
            },
        )
        save_checkpoint(student_path(out, k), pack_int8(ema.state_dict()), meta)
        metas[k] = meta
    return metas[SHIPPED_STEPS[0]]
