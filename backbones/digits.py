"""The built-in digits backbone: prompts naming a digit, the teacher and its DDIM sampler, the judge's quality.

The data and prompts live in :mod:`~un0_bench.backbones.digits_data` (re-exported here); the
modules this backbone builds on (teacher, sampler, judge, quality) import that module, not this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from un0_bench.backbones.digits_data import (  # noqa: F401  (re-exported: the digits world's names)
    ACCEPTED_FORMS,
    DEFAULT_STEPS,
    HELD_OUT_FRACTION,
    IMAGE_SHAPE,
    IMAGE_SIZE,
    SPLIT_SEED,
    WEIGHTS_DIR,
    DigitsData,
    load_data,
    prompt_label,
    prompt_labels,
    to_unit,
)
from un0_bench.harness.core.backbone import Backbone, QualityOptions
from un0_bench.harness.errors import UserError

if TYPE_CHECKING:
    from un0_bench.harness.core.generator import GenerationResult, Generator
    from un0_bench.harness.core.model import Model, Plan


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

    def denoiser_config(self) -> dict[str, Any]:
        from un0_bench.backbones.teacher import UNET_CONFIG

        return UNET_CONFIG

    def schedule_config(self) -> dict[str, Any]:
        from un0_bench.backbones.ddim import SCHEDULER_CONFIG

        return SCHEDULER_CONFIG

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
        from un0_bench.harness.core.model import Plan

        return Plan("digits", "UNet2DModel", DEFAULT_STEPS if steps is None else steps, weights="teacher",
                    default_steps=DEFAULT_STEPS)

    def check_base_weights(self) -> list[Path]:
        from un0_bench.backbones.teacher import UNET_CONFIG
        from un0_bench.harness.weights.checkpoints import check_checkpoint

        check_checkpoint(self.weights("teacher"), expected_config=UNET_CONFIG)
        return [self.weights("teacher")]

    def base_model(self, steps: int | None) -> Model:
        """The shipped teacher (fresh copy) with ``steps`` DDIM steps; its derivation is its training."""
        from un0_bench.backbones.teacher import load_teacher
        from un0_bench.harness.core.model import Model

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
        if options.samples > 0:
            # Pre-flight: the judge opens and fits its config now, not after the first cell is measured.
            from un0_bench.backbones import quality

            quality.default_judge()

    def quality_band(self, q: dict[str, Any], ref: dict[str, Any], options: QualityOptions
                     ) -> tuple[bool, bool | None]:
        from un0_bench.backbones.quality import QualityBand

        band = QualityBand(options.fid_ratio, options.accuracy_drop)
        return band.matched(q, ref), band.marginal(q, ref)
