"""What every backbone provides to the runner: prompts, its base models and sampler, its quality rule.

The instrument (everything in ``harness/``) knows backbones only through this class: a backbone
supplies the prompts it understands, builds its base diffusion model (a denoiser, see
:mod:`~un0_bench.harness.core.technique`), runs it with its own sampler (which calls the hooks every
technique uses), and judges the quality of generated images with its own evaluator and band rule
(digits: FID, KID and accuracy in a shipped judge's features; pipelines: CLIP score). A technique
that loads shipped weights gets their paths and the configs they were made for from it too
(:meth:`Backbone.weights`, :meth:`Backbone.denoiser_config`, :meth:`Backbone.schedule_config`), so no
technique imports a backbone.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from un0_bench.harness.core.generator import GenerationResult, Generator
    from un0_bench.harness.core.model import Model, Plan


@dataclass(frozen=True)
class QualityOptions:
    """How a run judges quality.

    Built by :meth:`~un0_bench.harness.running.config.QualityConfig.options` (the defaults are there).

    Attributes:
        samples: Images per model to evaluate (0: quality not measured).
        seeds: Disjoint draws of ``samples`` images (a backbone may refuse more than one).
        fid_ratio: A FID-scored backbone's band: FID at most this multiple of the reference's.
        accuracy_drop: Accuracy (or relative CLIP score) at most this much below the reference's.
        clip: A local CLIP model folder, for backbones scored by CLIP (``None``: not given).
    """

    samples: int
    seeds: int
    fid_ratio: float
    accuracy_drop: float
    clip: str | None = None


class Backbone(abc.ABC):
    """A family of weights plus the prompts it understands, its sampler and its quality evaluator.

    Attributes:
        name: Backbone spec as written (``"digits"``, ``"diffusers:./models/sd15"``).
        kind: Registry name (``"digits"``, ``"diffusers"``); generator entries declare the kinds
            they support.
    """

    name: str
    kind: str

    @abc.abstractmethod
    def check_prompt(self, prompt: str) -> None:
        """Raise :class:`~un0_bench.harness.errors.PromptError` (listing accepted forms) for a bad prompt."""

    @abc.abstractmethod
    def default_prompts(self, n: int) -> list[str]:
        """``n`` prompts for a benchmark run, spread evenly over what the backbone can draw."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Facts for the report: data source, image size, hash of the data."""

    def unmeasurable(self) -> str | None:
        """Why no meter can measure a run on this backbone (``None``: runs are measured normally).

        A backbone built without weights (``arch:NAME``, on the meta device) executes nothing a meter
        could watch; ``compare`` refuses it with this reason, and its work is counted instead.
        """
        return None

    # -- the base diffusion model and its sampler -------------------------------------------------

    def plan_base(self, steps: int | None) -> Plan:
        """What the base model would be (denoiser class, steps), without loading anything."""
        raise NotImplementedError(f"backbone {self.kind} has no base diffusion model")

    def base_model(self, steps: int | None) -> Model:
        """The base diffusion model: a fresh denoiser (techniques change it in place) and its steps."""
        raise NotImplementedError(f"backbone {self.kind} has no base diffusion model")

    def check_base_weights(self) -> list[Path]:
        """Open the base model's weights files without loading them (pre-flight); return their paths.

        Raise ``CheckpointError`` naming the file. Default: no file to check.
        """
        return []

    def weights_name(self, path: Path) -> str:
        """How records name a weights file of this backbone (default: its file name)."""
        return Path(path).name

    # -- what a technique that ships weights needs to know (they arrive here, not by importing a backbone)

    def weights(self, name: str) -> Path:
        """The path of this backbone's shipped weights file ``name`` (``"teacher"``, ``"sd-int8"``, ...)."""
        raise NotImplementedError(f"backbone {self.kind} ships no weights files")

    def denoiser_config(self) -> dict[str, Any]:
        """The config the base denoiser is built from; files derived from it record it and are checked against it."""
        raise NotImplementedError(f"backbone {self.kind} has no denoiser config")

    def schedule_config(self) -> dict[str, Any]:
        """The noise schedule the base denoiser was trained on and its sampler steps with."""
        raise NotImplementedError(f"backbone {self.kind} has no noise schedule config")

    def sampler(self, model: Model) -> Generator:
        """The backbone's sampler around ``model``: a generator that calls every layer's hooks."""
        raise NotImplementedError(f"backbone {self.kind} has no sampler")

    # -- quality ----------------------------------------------------------------------------------

    def check_quality_options(self, options: QualityOptions) -> None:
        """Refuse options this backbone cannot honour (raise UserError). Default: accept."""

    def evaluate_quality(self, generator: Generator, measured: GenerationResult,
                         options: QualityOptions) -> dict[str, Any] | None:
        """Quality of ``generator`` (``measured``: the images of the metered request); ``None``: not measured."""
        return None

    def quality_missing_reason(self, options: QualityOptions) -> str:
        """Why :meth:`evaluate_quality` returns ``None`` under ``options``."""
        return "--quality-samples 0" if options.samples == 0 else f"no quality evaluator for backbone {self.kind}"

    def quality_band(self, q: dict[str, Any], ref: dict[str, Any], options: QualityOptions
                     ) -> tuple[bool, bool | None]:
        """``(matched, marginal)`` of quality ``q`` against the reference's ``ref`` under this backbone's rule."""
        raise NotImplementedError(f"backbone {self.kind} has no quality band")
