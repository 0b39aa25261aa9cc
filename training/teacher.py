"""``un0-bench train teacher``: the digits teacher (``backbones/teacher.py``) trained from a seed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from un0_bench.backbones.ddim import SCHEDULER_CONFIG, make_scheduler
from un0_bench.backbones.digits_data import load_data
from un0_bench.backbones.teacher import TEACHER_FILE, UNET_CONFIG, build_unet
from un0_bench.harness.weights.checkpoints import save_checkpoint
from un0_bench.harness.weights.derivation import metered_training
from un0_bench.training.loop import ema_update, one_cycle, run_steps, train_command, training_metadata

TRAIN_DEFAULTS = {"steps": 1500, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.995, "seed": 0}


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
        kind="digits-teacher", config=UNET_CONFIG, energy=energy, losses=losses,
        command=train_command("teacher", steps=steps, batch_size=batch_size, seed=seed),
        train={"steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": decay, "seed": seed},
        extra={"scheduler": SCHEDULER_CONFIG, "data_sha256": data.sha256},
    )
    save_checkpoint(out, ema.state_dict(), meta)
    return meta
