"""The teacher's deterministic DDIM map as training pairs: what the students (distilled, un0, un0-osc) learn."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from un0_bench.backbones.teacher import TEACHER_FILE, load_teacher

#: Seeds of training pairs start here, far from the seeds benchmarks use (0 upwards).
PAIRS_SEED_BASE = 1_000_000

#: Images per teacher batch when the pairs are made (their cost is counted at this batch too).
PAIRS_BATCH = 256


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("UN0_BENCH_CACHE", Path.home() / ".cache" / "un0-bench"))


@torch.no_grad()
def teacher_pairs(n: int, steps: int = 50, batch_size: int = PAIRS_BATCH, path: Path = TEACHER_FILE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` (noise, label, image) triples from the teacher's deterministic DDIM map.

    Students (distilled, Un-0, oscillator) learn this map: the same noise to the same image. Labels
    cycle over the ten digits; image ``i`` starts from ``image_noise(PAIRS_SEED_BASE, i)``. The result
    is cached on disk (keyed by the teacher file's hash, ``n`` and ``steps``) because making it costs
    ``n x steps`` teacher forwards.

    Returns:
        noise ``(n, 1, 16, 16)``, labels ``(n,)`` int64, images ``(n, 1, 16, 16)`` in [-1, 1].
    """
    import hashlib

    from un0_bench.backbones.digits_data import IMAGE_SHAPE
    from un0_bench.harness.core.generator import image_noise

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    cache = _cache_dir() / f"teacher-pairs-{digest}-n{n}-s{steps}.pt"
    # Pair i depends only on i (its own noise; batches of batch_size from index 0), so any cached
    # set of the same teacher and steps is a prefix of this one: slice a larger one, extend a smaller.
    cached = {int(m.group(1)): f for f in _cache_dir().glob(f"teacher-pairs-{digest}-n*-s{steps}.pt")
              if (m := re.fullmatch(rf"teacher-pairs-{digest}-n(\d+)-s{steps}\.pt", f.name))}
    larger = [k for k in cached if k >= n]
    if larger:
        blob = torch.load(cached[min(larger)], weights_only=True)
        return blob["noise"][:n], blob["labels"][:n], blob["images"][:n]
    # Extend only from a prefix that ends on a batch boundary, so every batch is the one a fresh run makes.
    smaller = [k for k in cached if k % batch_size == 0]
    done = max(smaller, default=0)
    from un0_bench.backbones.ddim import ddim_sample

    unet, _ = load_teacher(path)
    noise = image_noise(PAIRS_SEED_BASE, 0, n, IMAGE_SHAPE)
    labels = torch.arange(n) % 10
    parts = [torch.load(cached[done], weights_only=True)["images"]] if done else []
    parts += [ddim_sample(unet, steps, noise[i : i + batch_size], labels[i : i + batch_size])
              for i in range(done, n, batch_size)]
    images = torch.cat(parts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"noise": noise, "labels": labels, "images": images}, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)
    return noise, labels, images


def teacher_pairs_energy(n: int, steps: int = 50, batch: int = PAIRS_BATCH, teacher: torch.nn.Module | None = None
                         ) -> dict[str, Any]:
    """What making ``n`` teacher pairs costs: the ``teacher_pairs`` parent every student's metadata includes.

    The pairs usually come from the on-disk cache, so their cost is not metered while a student
    trains. One DDIM step of a ``batch``-image batch (the batch :func:`teacher_pairs` samples in) is
    counted op by op (the proxy figure, deterministic) and another is timed (the wall figure, an
    estimate); both are scaled to ``steps`` steps of ``n / batch`` batches. One step stands for all:
    every step runs the same network on the same shapes.

    Args:
        n: Pairs (a multiple of ``batch``).
        steps: DDIM steps of the teacher per pair.
        batch: Images per teacher batch.
        teacher: The teacher UNet (default: the shipped one, loaded).

    Returns:
        ``{"energy": {meter: entry}, "pairs": n, "teacher_steps": steps}``, as ``add_parent`` takes it.
    """
    from un0_bench.backbones.ddim import ddim_sample
    from un0_bench.backbones.digits_data import IMAGE_SHAPE
    from un0_bench.harness.core.generator import image_noise
    from un0_bench.harness.counters.ops import OpCounter
    from un0_bench.harness.weights.derivation import TrainingEnergy

    if n < 1 or n % batch:
        raise ValueError(f"teacher_pairs_energy: n ({n}) must be a positive multiple of batch ({batch})")
    unet = load_teacher(TEACHER_FILE)[0] if teacher is None else teacher
    noise = image_noise(PAIRS_SEED_BASE, 0, batch, IMAGE_SHAPE)
    labels = torch.arange(batch) % 10
    with OpCounter() as counter:
        ddim_sample(unet, 1, noise, labels)
    t0 = time.perf_counter()
    ddim_sample(unet, 1, noise, labels)
    step_s = time.perf_counter() - t0
    batches = n // batch
    energy = TrainingEnergy()
    energy.add_proxy(counter.counts(images=batch), steps * batches)
    energy.by_meter["proxy"]["note"] = (f"teacher_pairs({n}, steps={steps}): counted one DDIM step of a {batch}-image "
                                        f"batch x {steps} steps x {batches} batches; the pairs are cached on disk, "
                                        "shared by the students")
    energy.by_meter["wall"] = {"status": "ok", "energy_j": None, "duration_s": step_s * steps * batches,
                               "note": f"timed one DDIM step of a {batch}-image batch x {steps} x {batches} (estimate)"}
    return {"energy": energy.by_meter, "pairs": n, "teacher_steps": steps}
