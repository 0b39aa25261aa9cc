"""An external command that writes N images to a folder, as a generator (``un0-bench run -- CMD``).

Each generate call runs the command once into a fresh ``DIR/images`` folder, told where and how
many through the placeholders ``{out}``, ``{n}`` and ``{seed}`` in its arguments and the environment
variables ``UN0_BENCH_OUT``, ``UN0_BENCH_IMAGES`` and ``UN0_BENCH_SEED``; the images are counted from
the files it wrote. The runner measures it as any model (warm-up, idle windows, repeated windows on
whole-device meters, wall time), so the window holds the whole process: start-up, model loading and
the images read back. Its quality is judged by the digits judge when the files are grayscale digits
(8x8 or 16x16); any other image is recorded as "quality: not measured" with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from un0_bench.harness.core.backbone import Backbone, QualityOptions
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.errors import UserError

KIND = "command"
#: File endings read as images (PIL opens them).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm")
#: Image sizes the digits judge reads (8x8: the sklearn digits' own size, upsampled as the data is).
DIGIT_SIZES = (8, 16)


def load_images(folder: Path) -> torch.Tensor:
    """The image files of ``folder`` in name order as floats ``(N, C, H, W)`` in [0, 1]; one shape for all."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    arrays = []
    for p in files:
        with Image.open(p) as img:
            arrays.append(np.array(img.convert("L") if img.mode in ("L", "1", "I;16", "P") else img.convert("RGB")))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"the command wrote images of different shapes to {folder}: {sorted(shapes)}")
    t = torch.from_numpy(np.stack(arrays)).float() / 255.0
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)


class CommandGenerator(Generator):
    """An external command as a generator: one run of it makes the ``n`` images of a request."""

    uncounted_reason = ("the command runs in another process: no operator counter sees its work, so its FLOPs "
                        "and bytes are unknown")

    def __init__(self, argv: list[str], n: int, images_dir: Path, seed: int) -> None:
        if not argv:
            raise UserError("un0-bench run needs a command after --, e.g. un0-bench run --out DIR -- python gen.py")
        self.argv, self.n, self.images_dir, self.seed = list(argv), n, images_dir, seed

    def command(self) -> list[str]:
        values = {"out": str(self.images_dir), "n": str(self.n), "seed": str(self.seed)}
        try:
            return [a.format(**values) for a in self.argv]
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"bad placeholder in the command ({e}); use {{out}}, {{n}} and {{seed}} "
                            f"(double braces for a literal brace)") from None

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if len(request.prompts) != self.n:
            raise UserError(f"the command makes {self.n} images a run, not {len(request.prompts)}")
        if self.images_dir.exists():
            shutil.rmtree(self.images_dir)
        self.images_dir.mkdir(parents=True)
        env = {**os.environ, "UN0_BENCH_OUT": str(self.images_dir), "UN0_BENCH_IMAGES": str(self.n),
               "UN0_BENCH_SEED": str(self.seed)}
        argv = self.command()
        try:
            done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  check=False)
        except OSError as e:
            raise UserError(f"cannot run {argv[0]!r}: {e.strerror or e}") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            last = lines[-1].strip() if lines else "(no stderr)"
            raise UserError(f"the command exited with code {done.returncode}: {last}")
        written = sum(1 for p in self.images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if written == 0:
            raise UserError(f"the command wrote no images to {self.images_dir} (image files: "
                            f"{', '.join(IMAGE_SUFFIXES)}); it is told the folder as {{out}} and $UN0_BENCH_OUT")
        if written < self.n:
            raise UserError(f"the command wrote {written} of {self.n} images to {self.images_dir}")
        images = load_images(self.images_dir)
        return GenerationResult(images=images[: self.n], prompts=request.prompts, info={"files": written})

    def describe(self) -> dict[str, Any]:
        return {"command": self.argv, "images_per_run": self.n, "seed": self.seed}


class CommandBackbone(Backbone):
    """The backbone of a command: no prompts; quality by the digits judge when the images are digits."""

    kind = KIND

    def __init__(self) -> None:
        self.name = KIND
        self.why_no_quality = "the command wrote no images yet"

    def check_prompt(self, prompt: str) -> None:
        """A command takes no prompt: every prompt is accepted and ignored."""

    def default_prompts(self, n: int) -> list[str]:
        return [""] * n

    def describe(self) -> dict[str, Any]:
        return {"kind": KIND, "prompts": "none (the command is told {out}, {n}, {seed})"}

    def evaluate_quality(self, generator: Generator, measured: GenerationResult,
                         options: QualityOptions) -> dict[str, Any] | None:
        images = measured.images
        n, c, h, w = images.shape
        if c != 1 or h != w or h not in DIGIT_SIZES:
            self.why_no_quality = (f"the images are {c}x{h}x{w}; the digits judge reads grayscale 8x8 or 16x16 "
                                   f"(image k showing digit k mod 10)")
            return None
        if n < 2:
            self.why_no_quality = "the digits judge needs at least 2 images (FID)"
            return None
        from un0_bench.backbones.digits_data import IMAGE_SIZE
        from un0_bench.backbones.quality import evaluate

        if h != IMAGE_SIZE:  # 8x8 as the sklearn digits are: upsampled as the data is
            images = torch.nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                                     align_corners=False).clamp(0, 1)
        return {**evaluate(images, torch.arange(n) % 10), "judged": "digits judge, image k read as digit k mod 10"}

    def quality_missing_reason(self, options: QualityOptions) -> str:
        return self.why_no_quality

    def quality_band(self, q: dict[str, Any], ref: dict[str, Any], options: QualityOptions
                     ) -> tuple[bool, bool | None]:
        from un0_bench.backbones.quality import QualityBand

        band = QualityBand(options.fid_ratio, options.accuracy_drop)
        return band.matched(q, ref), band.marginal(q, ref)
