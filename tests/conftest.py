"""Shared fixtures: tiny generators and fake meters that subclass the real base classes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator, image_noise
from un0_bench.harness.meters.base import Meter, Reading


class MatmulGenerator(Generator):
    """A generator whose cost is known by hand: per image one (1, 16) @ (16, 16) matmul.

    FLOPs per image = 2 * 1 * 16 * 16 = 512.
    """

    def __init__(self) -> None:
        self.weight = torch.eye(16)
        self.calls = 0

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.calls += 1
        out = []
        for first, prompts in request.batches():
            z = image_noise(request.seed, first, len(prompts), (16,))  # (B, 16)
            out.append(torch.sigmoid(z @ self.weight).reshape(len(prompts), 1, 4, 4))
        return GenerationResult(images=torch.cat(out), prompts=request.prompts)

    def describe(self) -> dict[str, Any]:
        return {"technique": "test"}


class SequenceMeter(Meter):
    """A whole-device meter driven by a deterministic energy counter (joules) and clock (seconds)."""

    name = "seq"
    sees_whole_device = True

    def __init__(self, energy_j: list[float], times_s: list[float]) -> None:
        super().__init__()
        self.energy = iter(energy_j)
        self.times = iter(times_s)

    def _start(self) -> None:
        self._e0, self._t0 = next(self.energy), next(self.times)

    def _stop(self) -> Reading:
        e1, t1 = next(self.energy), next(self.times)
        return Reading(meter=self.name, duration_s=t1 - self._t0, energy_j={"package-0": e1 - self._e0})


@pytest.fixture
def matmul_generator() -> MatmulGenerator:
    return MatmulGenerator()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny Stable Diffusion pipeline folder, built once per test session."""
    from un0_bench.backbones.tiny_pipeline import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module runs: the tiny pipeline's ops are too small to share between
    threads, and on a busy 2-core host two threads ran them up to 20x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
