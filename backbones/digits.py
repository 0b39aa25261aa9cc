"""The built-in digits world: scikit-learn's handwritten digits, prompts naming a digit, the teacher.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from un0_bench.harness.backbone import Backbone, QualityOptions
from un0_bench.harness.errors import PromptError, UserError

if TYPE_CHECKING:
    from un0_bench.harness.generator import GenerationResult, Generator
    from un0_bench.harness.technique import Model, Plan

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


class DigitsBackbone(Backbone):
    """The digits world. Prompts name one digit; weights live in ``backbones/weights/digits``."""

    kind = "digits"

    def __init__(self, arg: str | None = None, weights_dir: Path | None = None) -> None:
        if arg:
            raise ValueError(f"the digits backbone takes no argument, got {arg!r}")
        self.name = "digits"
        self.weights_dir = Path(weights_dir) if weights_dir else WEIGHTS_DIR

    def check_prompt(self, prompt: str) -> None:
        prompt_label(prompt)

    def default_prompts(self, n: int) -> list[str]:
        # Cycle evenly over the ten digits so every class gets n/10 images.
        return [f"digit {i % 10}" for i in range(n)]

    def weights(self, name: str) -> Path:
        return self.weights_dir / f"{name}.safetensors"

    def describe(self) -> dict[str, Any]:
        data = load_data()
        return {
            "backbone": self.name,
            "source": "sklearn.datasets.load_digits (1,797 images, 8x8, upsampled to 16x16)",
            "image_shape": list(IMAGE_SHAPE),
            "train_images": len(data.train_labels),
            "held_out_images": len(data.test_labels),
            "data_sha256": data.sha256,
        }

    # -- the base model and its sampler -----------------------------------------------------------

    def plan_base(self, steps: int | None) -> Plan:
        from un0_bench.harness.technique import Plan

        return Plan("digits", "UNet2DModel", DEFAULT_STEPS if steps is None else steps, weights="teacher")

    def base_model(self, steps: int | None) -> Model:
        """The shipped teacher (fresh copy) with ``steps`` DDIM steps; its derivation is its training."""
        from un0_bench.backbones.teacher import load_teacher
        from un0_bench.harness.technique import Model

        unet, meta = load_teacher(self.weights("teacher"))
        return Model(denoiser=unet, steps=DEFAULT_STEPS if steps is None else steps, derivation=meta)

    def sampler(self, model: Model) -> Generator:
        from un0_bench.backbones.ddim import DigitsSampler

        return DigitsSampler(model)

    # -- quality: FID, KID and accuracy in the shipped judge's features ---------------------------

    def evaluate_quality(self, generator: Generator, measured: GenerationResult,
                         options: QualityOptions) -> dict[str, Any] | None:
        if options.samples == 0:
            return None
        from un0_bench.backbones.quality import evaluate_generator_seeds

        return evaluate_generator_seeds(generator, n=options.samples, seeds=options.seeds)

    def check_quality_options(self, options: QualityOptions) -> None:
        if options.samples == 1:
            raise UserError("--quality-samples must be 0 (off) or at least 2 on digits: FID needs two images")

    def quality_band(self, q: dict[str, Any], ref: dict[str, Any], options: QualityOptions
                     ) -> tuple[bool, bool | None]:
        from un0_bench.backbones.quality import QualityBand

        band = QualityBand(options.fid_ratio, options.accuracy_drop)
        return band.matched(q, ref), band.marginal(q, ref)
