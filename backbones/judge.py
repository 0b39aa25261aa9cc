"""The digits judge: a small CNN classifier whose penultimate features define FID and KID on digits.

Quality on the digits backbone is measured in this network's feature space (as FID measures in
Inception v3's) and by its reading of each image (conditional accuracy: is a "digit 7" a 7?). It is
trained on the training split only, so the held-out split stays a fair "real" reference.
``un0-bench train judge`` reproduces the shipped weights from a seed.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.backbones.digits_data import IMAGE_SIZE, WEIGHTS_DIR, load_data
from un0_bench.harness.checkpoints import load_checkpoint, load_into, save_checkpoint
from un0_bench.harness.training import metered_training, one_cycle, run_steps, training_metadata

#: Architecture. Two conv stages (16 -> 8 -> 4 px), then a ``features``-wide penultimate layer.
JUDGE_CONFIG: dict[str, Any] = {
    "image_size": IMAGE_SIZE,
    "in_channels": 1,
    "channels": [16, 32],
    "features": 64,
    "classes": 10,
}

TRAIN_DEFAULTS: dict[str, Any] = {"steps": 1000, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4,
                                  "max_shift_px": 1, "seed": 0}
JUDGE_FILE = WEIGHTS_DIR / "judge.safetensors"


class DigitsJudge(nn.Module):
    """CNN classifier for ``(B, 1, 16, 16)`` digits in [-1, 1].

    Two stages of two 3x3 convolutions with ReLU and a 2x2 max-pool (16x16 -> 8x8 -> 4x4), a linear
    layer to ``features`` units (the penultimate features), ReLU, and a linear head to the classes.
    """

    def __init__(self, *, image_size: int, in_channels: int, channels: list[int], features: int,
                 classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, features))
        self.head = nn.Linear(features, classes)
        self.num_features = features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, features)`` of images ``x`` ``(B, 1, 16, 16)`` in [-1, 1].

        These are the penultimate layer's pre-activations (before its ReLU): after the ReLU about a
        quarter of the units are zero on every real digit, and the pre-activations are closer to the
        Gaussian that FID fits.
        """
        return self.feature(self.conv(x))  # (B, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, classes)``."""
        return self.head(F.relu(self.features(x)))


def build_judge() -> DigitsJudge:
    return DigitsJudge(**copy.deepcopy(JUDGE_CONFIG))


def load_judge(path: Path = JUDGE_FILE) -> tuple[DigitsJudge, dict[str, Any]]:
    """The trained judge in eval mode, with its metadata. Refuses a file made for another config."""
    state, meta = load_checkpoint(path, expected_config=JUDGE_CONFIG)
    judge = build_judge()
    load_into(judge, state, path)
    return judge.eval().requires_grad_(False), meta


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


@torch.no_grad()
def held_out_accuracy(judge: nn.Module) -> tuple[int, int]:
    """``(correct, total)`` on the held-out split (the data FID and KID compare against)."""
    data = load_data()
    pred = judge.eval()(data.test_images).argmax(dim=1)
    return int((pred == data.test_labels).sum()), len(data.test_labels)


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
        kind="digits-judge", config=JUDGE_CONFIG, energy=energy,
        extra={
            "command": f"un0-bench train judge --steps {steps} --seed {seed}",
            "train": {**TRAIN_DEFAULTS, "steps": steps, "seed": seed},
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
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
