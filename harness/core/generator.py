"""The one interface every image generator implements, and its request and result dataclasses."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate.

    Attributes:
        prompts: One prompt per image; the backbone decides which prompts it accepts.
        seed: Image ``i`` starts from noise seeded with ``seed + i``, so an image does not depend
            on the batch it was generated in.
        batch_size: How many images the generator processes at once.
    """

    prompts: tuple[str, ...]
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise ValueError("a generation request needs at least one prompt")
        if not all(isinstance(p, str) for p in self.prompts):
            raise TypeError("prompts must be strings")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def batches(self) -> list[tuple[int, tuple[str, ...]]]:
        """``(index of first image, prompts)`` for each batch, in order."""
        n, b = len(self.prompts), self.batch_size
        return [(i, self.prompts[i : i + b]) for i in range(0, n, b)]


@dataclass
class GenerationResult:
    """What a generator produced.

    Attributes:
        images: Float tensor ``(N, C, H, W)`` with values in ``[0, 1]``, one per prompt, in order.
        prompts: The prompts, in the same order.
        info: Generator-specific facts about this call (cache hits, steps run, ...).
    """

    images: torch.Tensor
    prompts: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)


#: The derivation of a generator that needed no training (the references): nothing to charge.
NOT_TRAINED: dict[str, Any] = {"energy": {}, "note": "nothing was trained"}


class Generator(abc.ABC):
    """An image generator under test.

    Subclasses implement :meth:`generate` and :meth:`describe`. The harness measures every generator
    the same way, from outside: nothing a generator reports about its own cost is trusted.
    """

    #: The model spec this instance was built from (e.g. ``"sd:steps=10"``); set by the registry.
    spec: str = ""
    #: ``None`` or a callable ``(kind, phase)``: called with ``("begin", phase)`` and ``("end", phase)``
    #: around every occurrence of each phase of :meth:`phases`, so the protocol can open and close a
    #: meter window on each. Phases never nest.
    phase_hook: Callable[[str, str], None] | None = None
    #: Why this generator's work cannot be counted in this process (e.g. it runs in another process), or
    #: ``None`` (counted). A generator that declares a reason gets null FLOPs and bytes, never 0.
    uncounted_reason: str | None = None

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate one image per prompt. Same request, same images. Bad prompts raise PromptError."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Facts for a report: parameters, dtype, steps, backbone, technique. JSON-serialisable."""

    def derivation(self) -> dict[str, Any] | None:
        """Metadata of the training or calibration that produced this model.

        The ledger's "amortised training" boundary reads ``energy`` from it (per meter). ``None``: not
        recorded, so that boundary is unknown (a pipeline's pretraining); a generator that needed no
        training at all returns :data:`NOT_TRAINED`, which the ledger charges as 0 J.
        """
        return None

    def reset_cache(self) -> None:
        """Forget cached work (e.g. gathered sub-networks), so the next call runs cold. Default: none."""

    def cache_stats(self) -> dict[str, Any] | None:
        """Cache hits, misses and bytes held, for generators that cache work; ``None`` otherwise."""
        return None

    def phases(self) -> tuple[str, ...]:
        """Names of the phases the generator can be metered by separately (empty: one phase)."""
        return ()

    def emit(self, kind: str, phase: str) -> None:
        """Tell the phase hook (if any) that ``phase`` begins (``kind="begin"``) or ends (``"end"``)."""
        hook = self.phase_hook
        if hook is not None:
            hook(kind, phase)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """``with self.phase("gate"): ...`` emits begin and end around the block, even if it raises."""
        return emitting(self.emit, name)


def image_noise(seed: int, first_index: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise for images ``first_index .. first_index + count - 1``: ``(count, *shape)``.

    Each image draws from its own ``torch.Generator`` seeded with ``seed + index``, so the noise of
    an image is the same whatever batch size it is generated with.
    """
    out = torch.empty((count, *shape))
    for k in range(count):
        g = torch.Generator().manual_seed(seed + first_index + k)
        out[k] = torch.randn(shape, generator=g)
    return out


@contextlib.contextmanager
def emitting(emit: Callable[[str, str], None], name: str) -> Iterator[None]:
    """``emit("begin", name)`` before the block and ``emit("end", name)`` after it, even if it raises."""
    emit("begin", name)
    try:
        yield
    finally:
        emit("end", name)
