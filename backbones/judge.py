"""The digits judge: a small CNN classifier whose penultimate features define FID and KID on digits.

Quality on the digits backbone is measured in this network's feature space (as FID measures in
Inception v3's) and by its reading of each image (conditional accuracy: is a "digit 7" a 7?). It is
trained on the training split only, so the held-out split stays a fair "real" reference.
``un0-bench train judge`` (``training/judge.py``) reproduces the shipped weights from a seed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.backbones.digits_data import IMAGE_SIZE, WEIGHTS_DIR, load_data
from un0_bench.harness.weights.checkpoints import load_checkpoint, load_into

#: Architecture. Two conv stages (16 -> 8 -> 4 px), then a ``features``-wide penultimate layer.
JUDGE_CONFIG: dict[str, Any] = {
    "image_size": IMAGE_SIZE,
    "in_channels": 1,
    "channels": [16, 32],
    "features": 64,
    "classes": 10,
}

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


@torch.no_grad()
def held_out_accuracy(judge: nn.Module) -> tuple[int, int]:
    """``(correct, total)`` on the held-out split (the data FID and KID compare against)."""
    data = load_data()
    pred = judge.eval()(data.test_images).argmax(dim=1)
    return int((pred == data.test_labels).sum()), len(data.test_labels)
