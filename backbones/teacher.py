"""The digits teacher: a class-conditional diffusers ``UNet2DModel`` (~1M parameters) with DDIM.

Every digits baseline and both Un-0 generators are derived from this network. ``un0-bench train
teacher`` reproduces the shipped weights from a seed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from un0_bench.backbones.ddim import SCHEDULER_CONFIG, make_scheduler  # noqa: F401  (the schedule it trains on)
from un0_bench.backbones.digits_data import IMAGE_SIZE, WEIGHTS_DIR, load_data
from un0_bench.backbones.hf import diffusers_class
from un0_bench.harness.checkpoints import load_checkpoint, load_into, save_checkpoint
from un0_bench.harness.training import ema_update, metered_training, one_cycle, run_steps, training_metadata

#: UNet2DModel config. Three resolutions (16, 8, 4), attention at 8x8, 10 class embeddings.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": 10,
}


TRAIN_DEFAULTS = {"steps": 1500, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.995, "seed": 0}
TEACHER_FILE = WEIGHTS_DIR / "teacher.safetensors"


def build_unet() -> torch.nn.Module:
    return diffusers_class("UNet2DModel")(**copy.deepcopy(UNET_CONFIG))



def load_teacher(path: Path = TEACHER_FILE) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained teacher in eval mode, with its metadata. Refuses a file made for another config."""
    state, meta = load_checkpoint(path, expected_config=UNET_CONFIG)
    unet = build_unet()
    load_into(unet, state, path)
    return unet.eval().requires_grad_(False), meta


def diffusion_loss(unet: torch.nn.Module, scheduler: Any, x0: torch.Tensor, labels: torch.Tensor,
                   g: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction loss at uniformly drawn timesteps."""
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
    xt = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(unet(xt, t, class_labels=labels).sample, noise)


def train_teacher(out: Path = TEACHER_FILE, steps: int = TRAIN_DEFAULTS["steps"],
                  batch_size: int = TRAIN_DEFAULTS["batch_size"], seed: int = TRAIN_DEFAULTS["seed"],
                  lr: float = TRAIN_DEFAULTS["lr"]) -> dict[str, Any]:
    """Train the teacher from seed ``seed`` and write weights (EMA) and metadata to ``out``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = load_data()
    x, y = data.train_images, data.train_labels
    unet = build_unet().train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = make_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    sched = one_cycle(opt, lr, steps, 0.05)
    decay = TRAIN_DEFAULTS["ema_decay"]

    def train_step() -> float:
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = diffusion_loss(unet, scheduler, x[idx], y[idx], g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    with metered_training() as energy:
        losses = run_steps(train_step, steps, "train teacher", scheduler=sched,
                           after_step=lambda step: ema_update(ema, unet, decay))
    # Count one more training step (forward, backward, optimizer) for the proxy figure. It changes
    # only the raw weights, not the EMA weights that are saved; a step's cost does not depend on them.
    energy.count_proxy(train_step, batch_size, steps)
    meta = training_metadata(
        kind="digits-teacher", config=UNET_CONFIG, energy=energy,
        extra={
            "command": f"un0-bench train teacher --steps {steps} --batch-size {batch_size} --seed {seed}",
            "scheduler": SCHEDULER_CONFIG, "train": {"steps": steps, "batch_size": batch_size, "lr": lr,
                                                   "ema_decay": decay, "seed": seed},
            "final_loss": sum(losses[-50:]) / len(losses[-50:]), "data_sha256": data.sha256,
        },
    )
    save_checkpoint(out, ema.state_dict(), meta)
    return meta


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
    from un0_bench.harness.generator import image_noise

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
