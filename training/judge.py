"""``un0-bench train judge``: the digits judge (``backbones/judge.py``) trained from a seed on the training split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from un0_bench.backbones.digits_data import load_data
from un0_bench.backbones.judge import JUDGE_CONFIG, JUDGE_FILE, build_judge, held_out_accuracy
from un0_bench.harness.weights.checkpoints import save_checkpoint
from un0_bench.harness.weights.derivation import metered_training
from un0_bench.training.loop import one_cycle, run_steps, train_command, training_metadata

TRAIN_DEFAULTS: dict[str, Any] = {"steps": 1000, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4,
                                  "max_shift_px": 1, "seed": 0}


def random_shift(x: torch.Tensor, max_shift_px: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image ``(B, C, H, W)`` by up to ``max_shift_px`` pixels in x and y (background filled)."""
    if max_shift_px == 0:
        return x
    b, _, h, w = x.shape
    m = max_shift_px
    # Pad with the background value (-1: no ink), then crop a window at a random offset per image.
    padded = F.pad(x, (m, m, m, m), value=-1.0)  # (B, C, H + 2m, W + 2m)
    dy = torch.randint(0, 2 * m + 1, (b,), generator=g).tolist()
    dx = torch.randint(0, 2 * m + 1, (b,), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_judge(steps: int | None = None, seed: int | None = None, out: Path | None = None) -> dict[str, Any]:
    """Train the judge from seed ``seed`` on the training split and write weights and metadata to ``out``.

    Args:
        steps: Optimizer steps (default: the shipped run's).
        seed: Seed of initialisation, batches and augmentation (default: the shipped run's).
        out: Weights file to write (default: the shipped ``judge.safetensors``).

    Returns:
        The metadata written beside the weights, including held-out accuracy.
    """
    steps = TRAIN_DEFAULTS["steps"] if steps is None else steps
    seed = TRAIN_DEFAULTS["seed"] if seed is None else seed
    out = JUDGE_FILE if out is None else Path(out)
    batch_size, lr, shift = TRAIN_DEFAULTS["batch_size"], TRAIN_DEFAULTS["lr"], TRAIN_DEFAULTS["max_shift_px"]
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = load_data()
    x, y = data.train_images, data.train_labels
    judge = build_judge().train()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=TRAIN_DEFAULTS["weight_decay"])
    sched = one_cycle(opt, lr, steps, 0.1)

    def train_step() -> float:
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = F.cross_entropy(judge(random_shift(x[idx], shift, g)), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    cpu0_s = time.process_time()
    with metered_training() as energy:
        losses = run_steps(train_step, steps, "train judge", scheduler=sched, every=50)
    cpu_s = time.process_time() - cpu0_s
    # Evaluate and snapshot before the counted step below changes the weights.
    judge.eval()
    correct, total = held_out_accuracy(judge)
    state = {k: v.clone() for k, v in judge.state_dict().items()}
    # Count one more training step (forward, backward, optimizer) for the proxy figure; a step's cost
    # does not depend on the weights, and the saved weights are the snapshot above.
    judge.train()
    energy.count_proxy(train_step, batch_size, steps)
    meta = training_metadata(
        kind="digits-judge", config=JUDGE_CONFIG, energy=energy, losses=losses,
        command=train_command("judge", steps=steps, seed=seed), train={**TRAIN_DEFAULTS, "steps": steps, "seed": seed},
        extra={
            # CPU time of this process (all threads): unlike wall time, other work on a shared host
            # does not inflate it.
            "process_cpu_s": cpu_s,
            # Reductions split across threads round differently: the weights are bit-reproducible
            # with the same seed and the same thread count.
            "torch_threads": torch.get_num_threads(),
            "held_out_accuracy": correct / total,
            "held_out_correct": correct,
            "held_out_images": total,
            "parameters": sum(p.numel() for p in judge.parameters()),
            "data_sha256": data.sha256,
        },
    )
    save_checkpoint(out, state, meta)
    return meta
