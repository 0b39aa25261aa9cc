"""The digits data and prompts: scikit-learn's handwritten digits, prompts naming a digit.

``sklearn.datasets.load_digits()`` ships 1,797 real 8x8 digits inside scikit-learn, so everything
here works offline. Images are scaled to [-1, 1] and resized to 16x16. A fixed stratified split
keeps 20% held out for quality evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from un0_bench.harness.errors import PromptError

IMAGE_SIZE = 16
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)  # (C, H, W)
WEIGHTS_DIR = Path(__file__).parent / "weights" / "digits"
SPLIT_SEED = 0
#: DDIM steps of ``sd`` on digits when none are given.
DEFAULT_STEPS = 50
HELD_OUT_FRACTION = 0.2

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_PROMPT = re.compile(
    r"^(?:(?:a|an|the)\s+)?(?:handwritten\s+)?(?:(?:digit|number)\s+)?"
    r"(?P<d>[0-9]|zero|one|two|three|four|five|six|seven|eight|nine)$"
)
ACCEPTED_FORMS = '"7", "digit 7", "a handwritten seven" (any digit 0-9, as a numeral or a word)'


def prompt_label(prompt: str) -> int:
    """The digit a prompt names; raises :class:`PromptError` listing the accepted forms."""
    m = _PROMPT.match(" ".join(prompt.lower().split())) if isinstance(prompt, str) else None
    if m is None:
        raise PromptError(f"the digits backbone cannot draw {prompt!r}; accepted prompts: {ACCEPTED_FORMS}")
    d = m.group("d")
    return int(d) if d.isdigit() else _WORDS.index(d)


def prompt_labels(prompts: tuple[str, ...] | list[str]) -> torch.Tensor:
    """``(N,)`` int64 labels for a list of prompts."""
    return torch.tensor([prompt_label(p) for p in prompts], dtype=torch.long)


@dataclass(frozen=True)
class DigitsData:
    """The split data set. Images ``(N, 1, 16, 16)`` float32 in [-1, 1]; labels ``(N,)`` int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    sha256: str


@functools.lru_cache(maxsize=1)
def load_data() -> DigitsData:
    """Load, scale, resize and split the digits (deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # (N, 8, 8) in [-1, 1]
    y = ds.target.astype(np.int64)
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    images = torch.from_numpy(x)[:, None]  # (N, 1, 8, 8)
    # NB: bilinear upsampling with align_corners=False keeps the range inside [-1, 1].
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(y)
    it, ie = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return DigitsData(images[it], labels[it], images[ie], labels[ie], digest)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map model space [-1, 1] to image space [0, 1] (clamped)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
