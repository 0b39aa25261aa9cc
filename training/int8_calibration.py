"""``un0-bench train sd-int8``: the static activation scales of ``int8:scales=static``, calibrated on real digits.

The technique (``baselines/int8.py``) loads the file this writes; here are the observers that record
each Conv2d/Linear input's range per timestep bucket, the noised digits they see, and the target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from un0_bench.baselines.int8 import INT8_SCHEME, TimestepBucket, int8_config, quantizable_layers, quantize_unet
from un0_bench.harness.errors import UserError
from un0_bench.harness.weights.checkpoints import save_checkpoint
from un0_bench.harness.weights.derivation import metered_training
from un0_bench.harness.weights.quantize import QMAX
from un0_bench.training.loop import train_command, training_metadata


def _abs_quantile(x: torch.Tensor, percentile: float) -> float:
    """The ``percentile`` (0-100] of ``|x|``; 100 is the max."""
    a = x.detach().abs().float().reshape(-1)
    if percentile >= 100.0:
        return float(a.max())
    k = max(1, math.ceil(percentile / 100.0 * a.numel()))
    return float(a.kthvalue(k).values)


@torch.no_grad()
def calibrate_activations(unet: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                          bucket: TimestepBucket, percentile: float = 100.0) -> dict[str, torch.Tensor]:
    """Static int8 scales of the inputs of every Conv2d/Linear of a float ``unet``, per timestep bucket.

    For each layer and bucket the scale is (the largest over batches of the ``percentile`` of
    ``|input|`` in a batch) / 127.

    Args:
        unet: The float32 UNet (not modified; hooks are removed afterwards).
        batches: ``(x_t (B, C, H, W), t (B,) equal timesteps, labels (B,))`` to run the UNet on.
        bucket: Bucketing of timesteps (its :attr:`~TimestepBucket.index` is changed).
        percentile: Clipping percentile of ``|input|`` per batch; 100 keeps the batch maximum.

    Returns:
        Layer name -> ``(n_buckets,)`` float32 scales.

    Raises:
        ValueError: If some bucket received no batch (its scale would be unknown).
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    names = quantizable_layers(unet)
    amax = {n: torch.zeros(bucket.n_buckets) for n in names}
    seen = torch.zeros(bucket.n_buckets, dtype=torch.bool)

    def observer(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            b = bucket.index
            amax[name][b] = max(float(amax[name][b]), _abs_quantile(args[0], percentile))
        return hook

    handles = [unet.get_submodule(n).register_forward_pre_hook(observer(n)) for n in names]
    try:
        for x, t, labels in batches:
            bucket.set(t)
            seen[bucket.index] = True
            unet(x, t, class_labels=labels)
    finally:
        for h in handles:
            h.remove()
    if not bool(seen.all()):
        missing = [i for i in range(bucket.n_buckets) if not seen[i]]
        raise ValueError(f"calibration saw no batch in timestep buckets {missing}; give timesteps covering all")
    # NB: a layer whose input was exactly zero everywhere gets a tiny positive scale (any scale
    # quantises zero exactly); the int8 layers refuse non-positive scales.
    return {n: torch.clamp(a, min=1e-12) / QMAX for n, a in amax.items()}


def calibration_batches(images: torch.Tensor, labels: torch.Tensor, timesteps: list[int], batches: int,
                        batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Real images noised to the sampler's timesteps: ``batches`` batches cycling over ``timesteps``.

    Each batch draws ``batch_size`` images (with replacement) and fresh Gaussian noise from a
    generator seeded with ``seed``, and noises them to one timestep with the teacher's schedule:
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    Yields:
        ``(x_t (B, 1, H, W), t (B,) int64, labels (B,))``.
    """
    from un0_bench.backbones.ddim import make_scheduler

    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(seed)
    for i in range(batches):
        idx = torch.randint(0, len(labels), (batch_size,), generator=g)
        noise = torch.randn((batch_size, *images.shape[1:]), generator=g)
        t = torch.full((batch_size,), int(timesteps[i % len(timesteps)]), dtype=torch.long)
        yield scheduler.add_noise(images[idx], noise, t), t, labels[idx]


#: The shipped calibration run (``un0-bench train sd-int8``). ``steps`` is the number of
#: calibration batches; they cycle over the timesteps of the default 50-step DDIM schedule, so each
#: of those timesteps sees ``steps / 50`` batches.
CALIBRATION_DEFAULTS: dict[str, Any] = {"steps": 100, "batch_size": 64, "seed": 0}


def calibrate_int8(steps: int | None = None, seed: int | None = None, out: Path | None = None) -> dict[str, Any]:
    """``un0-bench train sd-int8``: calibrate the int8 activation scales on real digits and save.

    The teacher runs in float32 on training digits noised to each timestep of the 50-step DDIM
    schedule (the inputs it sees while sampling, with real digits in place of its own samples, so
    the scales do not inherit the teacher's errors); every Conv2d/Linear input's 99.99th
    percentile of |x| is recorded per timestep bucket. The saved file holds the whole quantised
    UNet (int8 weights and their scales, activation scales, float32 biases, norms and
    embeddings), about 1.2 MB.

    Args:
        steps: Calibration batches (default ``CALIBRATION_DEFAULTS["steps"]``).
        seed: Seed of the image and noise draws (default 0).
        out: Weights file (default ``backbones/weights/digits/sd-int8.safetensors``).

    Returns:
        The metadata written beside the weights.
    """
    from un0_bench.backbones.ddim import make_scheduler
    from un0_bench.backbones.digits import DEFAULT_STEPS, WEIGHTS_DIR, load_data
    from un0_bench.backbones.teacher import TEACHER_FILE, UNET_CONFIG, load_teacher

    steps = CALIBRATION_DEFAULTS["steps"] if steps is None else steps
    seed = CALIBRATION_DEFAULTS["seed"] if seed is None else seed
    out = WEIGHTS_DIR / "sd-int8.safetensors" if out is None else Path(out)
    batch_size = CALIBRATION_DEFAULTS["batch_size"]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    teacher, teacher_meta = load_teacher(TEACHER_FILE)
    data = load_data()
    sched = make_scheduler()
    sched.set_timesteps(DEFAULT_STEPS)
    timesteps = [int(t) for t in sched.timesteps]
    bucket = TimestepBucket(INT8_SCHEME["timestep_buckets"], sched.config.num_train_timesteps)
    percentile = INT8_SCHEME["percentile"]
    # Batches cycle over the timesteps, so the first `needed` batches are the fewest that reach every
    # bucket; fewer would leave a bucket with no activation scale.
    first_seen = {}
    for i, t in enumerate(timesteps):
        first_seen.setdefault(bucket.of(t), i)
    needed = max(first_seen.values()) + 1
    if steps < needed:
        raise UserError(f"sd-int8 calibration needs at least {needed} batches (--steps) so that each of "
                         f"the {bucket.n_buckets} timestep buckets gets a scale; got {steps}")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return calibration_batches(data.train_images, data.train_labels, timesteps, steps, batch_size, seed)

    with metered_training() as energy:
        scales = calibrate_activations(teacher, batches(), bucket, percentile)
        qunet = quantize_unet(teacher, scales, bucket)
    # The proxy figure: one calibration batch (a forward with the observers) counted, times steps.
    energy.count_proxy(lambda: calibrate_activations(teacher, [next(batches())], TimestepBucket(1), percentile),
                       batch_size, steps)
    energy.add_parent("teacher", teacher_meta)
    calibration = {"steps": steps, "batch_size": batch_size, "seed": seed, "timesteps": timesteps,
                   "percentile": percentile}
    meta = training_metadata(kind="digits-sd-int8", config=int8_config(UNET_CONFIG, TEACHER_FILE), energy=energy,
                             command=train_command("sd-int8", steps=steps, seed=seed),
                             extra={"calibration": calibration, "data_sha256": data.sha256})
    save_checkpoint(out, qunet.state_dict(), meta)
    return meta
