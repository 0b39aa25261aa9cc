"""The teacher's deterministic DDIM map as training pairs: what the students (distilled, un0, un0-osc) learn."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from un0_bench.backbones.teacher import TEACHER_FILE, load_teacher

#: Seeds of training pairs start here, far from the seeds benchmarks use (0 upwards).
PAIRS_SEED_BASE = 1_000_000


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("UN0_BENCH_CACHE", Path.home() / ".cache" / "un0-bench"))


@torch.no_grad()
def teacher_pairs(n: int, steps: int = 50, batch_size: int = 256, path: Path = TEACHER_FILE
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
