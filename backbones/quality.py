"""Quality of generated digits: FID and KID in the judge's feature space, and conditional accuracy.

The real distribution is the held-out split of the digits data (``load_data().test_*``, 360 images),
which neither the teacher nor the judge saw in training. FID and KID are computed by torchmetrics
with the judge's penultimate layer as a custom feature extractor (the role Inception v3 plays for
photographs); conditional accuracy is the share of images the judge reads as the digit their prompt
named. Energy is compared at matched quality: :func:`quality_matched` says whether a result is
within the band of a reference result.

Scale of the numbers (shipped judge, n = 1000, seed 500,000): FID 24.7 for uniform noise, 5.2 for
the teacher at 2 DDIM steps, 0.27 at 10 steps, 0.21 at 50 steps, 0.003 for held-out real digits.
FID is biased upwards at small n, so compare results evaluated with the same n. KID is unbiased: it
scatters around 0 (and can be negative) for sets close to the real one.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from un0_bench.backbones.digits_data import IMAGE_SHAPE, load_data, prompt_labels, to_unit
from un0_bench.harness.core.generator import GenerationRequest, Generator
from un0_bench.harness.running.config import DEFAULT_ACCURACY_DROP, DEFAULT_FID_RATIO

#: Seed of the images :func:`evaluate_generator` draws: far from the seeds benchmarks use (0 upwards)
#: and from the teacher's training pairs (1,000,000 upwards).
EVAL_SEED = 500_000
#: Images per KID subset (at most the 360 held-out images); torchmetrics averages over subsets.
KID_SUBSET_SIZE = 100
#: Number of random subsets KID averages over.
KID_SUBSETS = 100
#: Seed of KID's subset draws, so the same images always give the same KID.
KID_SEED = 0


class JudgeFeatures(nn.Module):
    """The judge's penultimate layer as a torchmetrics feature extractor.

    Takes images ``(N, 1, 16, 16)`` in [0, 1] (the generator interface's range), maps them to the
    judge's [-1, 1] and returns features ``(N, D)`` as float64, multiplied by ``scale``. torchmetrics
    accumulates FID's means and covariances in float64 and returns FID in the features' dtype, so
    FID's matrix square root is float64 throughout.
    """

    def __init__(self, judge: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.scale = scale
        self.num_features = int(judge.num_features)  # torchmetrics reads the width from here

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        # NB: the network runs in float32 (oneDNN has no float64 convolutions, and float32 features
        # are exact to ~1e-7 relative); only the statistics are float64.
        return self.judge.features(images01.float() * 2.0 - 1.0).double() * self.scale  # (N, D)


@functools.lru_cache(maxsize=1)
def default_judge() -> nn.Module:
    """The shipped judge (loaded once)."""
    from un0_bench.backbones.judge import load_judge

    judge, _ = load_judge()
    return judge


def real_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The real distribution: held-out digits ``(360, 1, 16, 16)`` in [0, 1] and their labels ``(360,)``."""
    data = load_data()
    return to_unit(data.test_images), data.test_labels


def _check_images(images01: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if not isinstance(images01, torch.Tensor) or images01.dim() != 4 or tuple(images01.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(images01.shape) if isinstance(images01, torch.Tensor) else type(images01).__name__
        raise ValueError(f"images must be a tensor (N, {', '.join(map(str, IMAGE_SHAPE))}), got {shape}")
    if not images01.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images01.dtype}")
    if images01.shape[0] < 2:
        raise ValueError(f"FID and KID need at least 2 images, got {images01.shape[0]}")
    if not bool(torch.isfinite(images01).all()) or float(images01.min()) < 0.0 or float(images01.max()) > 1.0:
        raise ValueError("images must be finite and in [0, 1] (generators return [0, 1], not [-1, 1])")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != (images01.shape[0],):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a tensor ({images01.shape[0]},), one per image, got {shape}")
        if labels.is_floating_point() or bool((labels < 0).any()) or bool((labels > 9).any()):
            raise ValueError("labels must be integer digits 0-9")


@dataclass(frozen=True)
class _JudgeState:
    """What one judge needs for every evaluation: its scaled extractor and metrics holding the real set."""

    extractor: JudgeFeatures
    fid: Any  # FrechetInceptionDistance with the real features added
    kid: Any  # KernelInceptionDistance with the real features added


# One state per judge: the real images go through the judge once, and each evaluation works on a
# copy of the metrics. Weak keys: dropping a judge frees its state.
_STATES: weakref.WeakKeyDictionary[nn.Module, _JudgeState] = weakref.WeakKeyDictionary()


def _state(judge: nn.Module) -> _JudgeState:
    if judge not in _STATES:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        # KID's kernel (x.y / D + 1)^3 assumes features of unit scale (as Inception's pooled features
        # roughly are); the judge's pre-activations reach ~+-50. One constant, fixed by the judge on
        # the training split, makes their mean square 1 per dimension: FID is then in those units.
        with torch.no_grad():
            train = JudgeFeatures(judge)(to_unit(load_data().train_images))  # (1437, D)
        extractor = JudgeFeatures(judge, scale=float(train.square().mean().rsqrt()))
        real, _ = real_images()
        # normalize=True: a custom extractor then receives float images unchanged (False: uint8).
        fid = FrechetInceptionDistance(feature=extractor, normalize=True)
        with warnings.catch_warnings():
            # KID warns that it keeps all features in memory: 64 floats per image here.
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            kid = KernelInceptionDistance(feature=extractor, normalize=True, subsets=KID_SUBSETS,
                                          subset_size=KID_SUBSET_SIZE)
        fid.update(real, real=True)
        kid.update(real, real=True)
        _STATES[judge] = _JudgeState(extractor, fid, kid)
    return _STATES[judge]


def features(images01: torch.Tensor, judge: nn.Module | None = None) -> torch.Tensor:
    """The features FID and KID compare: ``(N, D)`` float64 for images ``(N, 1, 16, 16)`` in [0, 1]."""
    _check_images(images01)
    return _state(judge if judge is not None else default_judge()).extractor(images01)


def evaluate(images01: torch.Tensor, labels: torch.Tensor, *, judge: nn.Module | None = None,
             kid_subset: int | None = None) -> dict[str, Any]:
    """FID, KID and conditional accuracy of generated digits against the held-out real digits.

    Args:
        images01: Generated images ``(N, 1, 16, 16)`` in [0, 1], ``N >= 2``.
        labels: The digit each image's prompt named, ``(N,)`` int.
        judge: The classifier whose features and readings are used (default: the shipped judge).
        kid_subset: Images per KID subset (default: ``min(100, N)``); at most ``N`` and at most the
            360 real images.

    Returns:
        ``fid`` (float64 arithmetic, in units of the scaled features; 0 for identical sets),
        ``kid`` and ``kid_std`` (mean and standard deviation over random subsets, seeded),
        ``accuracy`` (0..1: share of images the judge reads as the prompted digit), ``samples``
        (N), ``kid_subset_size`` and ``real_samples``.
    """
    _check_images(images01, labels)
    judge = judge if judge is not None else default_judge()
    n = images01.shape[0]
    n_real = len(load_data().test_labels)
    subset = min(KID_SUBSET_SIZE, n) if kid_subset is None else kid_subset
    if isinstance(subset, bool) or not isinstance(subset, int) or not 2 <= subset <= min(n, n_real):
        raise ValueError(f"kid_subset must be an integer from 2 to {min(n, n_real)} (images and real images), "
                         f"got {kid_subset!r}")
    images01 = images01.float()
    state = _state(judge)
    fid, kid = copy.deepcopy(state.fid), copy.deepcopy(state.kid)
    kid.subset_size = subset
    fid.update(images01, real=False)
    kid.update(images01, real=False)
    # KID draws its subsets with torch.randperm from the global generator: seed it, and restore it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)
        kid_mean, kid_std = kid.compute()
    with torch.no_grad():
        pred = judge.eval()(images01 * 2.0 - 1.0).argmax(dim=1)  # (N,)
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "accuracy": float((pred == labels.to(pred.device)).float().mean()),
        "samples": n,
        "kid_subset_size": subset,
        "real_samples": n_real,
    }


def eval_prompts(n: int) -> tuple[str, ...]:
    """``n`` prompts cycling evenly over the ten digits (``"digit 0"``, ``"digit 1"``, ...)."""
    return tuple(f"digit {i % 10}" for i in range(n))


def evaluate_generator(generator: Generator, n: int = 1000, seed: int = EVAL_SEED, batch_size: int = 250,
                       *, judge: nn.Module | None = None) -> dict[str, Any]:
    """Generate ``n`` digits (prompts cycling over 0-9, fixed seed) and :func:`evaluate` them.

    The result also records ``seed``, so a record says which images were judged.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    prompts = eval_prompts(n)
    result = generator.generate(GenerationRequest(prompts, seed=seed, batch_size=batch_size))
    if tuple(result.images.shape) != (n, *IMAGE_SHAPE):
        raise ValueError(f"generator returned images of shape {tuple(result.images.shape)}, "
                         f"expected {(n, *IMAGE_SHAPE)}")
    return {**evaluate(result.images, prompt_labels(prompts), judge=judge), "seed": seed}


def evaluate_generator_seeds(generator: Generator, n: int = 1000, seeds: int = 1, *,
                             judge: nn.Module | None = None) -> dict[str, Any]:
    """:func:`evaluate_generator` on ``seeds`` disjoint draws of ``n`` images, averaged.

    Draw ``k`` uses seeds ``EVAL_SEED + k n`` onwards (image ``i`` of a draw uses its first seed +
    ``i``), so no image is judged twice. FID moves between draws by more than some models' distance
    to the band (measured: ~0.012 to 0.025 standard deviation at n = 1,000 for FIDs near 0.2), so
    with ``seeds >= 2`` the result also gives each draw's FID and their standard deviation, and
    :meth:`QualityBand.marginal` can say when a verdict is within that noise.

    Returns:
        One draw: exactly :func:`evaluate_generator`'s result. Several: the mean ``fid``, ``kid``
        and ``accuracy`` over the draws, ``fid_draws``, ``fid_std`` (sample standard deviation),
        ``accuracy_draws``, ``seeds`` and ``samples`` (images per draw).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    draws = [evaluate_generator(generator, n=n, seed=EVAL_SEED + k * n, judge=judge) for k in range(seeds)]
    if seeds == 1:
        return draws[0]
    fids = torch.tensor([d["fid"] for d in draws], dtype=torch.float64)
    return {
        **draws[0],
        "fid": float(fids.mean()),
        "kid": sum(d["kid"] for d in draws) / seeds,
        "kid_std": sum(d["kid_std"] for d in draws) / seeds,
        "accuracy": sum(d["accuracy"] for d in draws) / seeds,
        "fid_draws": fids.tolist(),
        "fid_std": float(fids.std()),
        "accuracy_draws": [d["accuracy"] for d in draws],
        "seeds": seeds,
    }


@dataclass(frozen=True)
class QualityBand:
    """How close to a reference a result must be to count as quality-matched.

    Attributes:
        fid_ratio: FID may be at most this multiple of the reference's FID.
        accuracy_drop: Conditional accuracy may be at most this much lower than the reference's
            (absolute, on the 0..1 scale: 0.03 is 3 percentage points).
    """

    fid_ratio: float = DEFAULT_FID_RATIO
    accuracy_drop: float = DEFAULT_ACCURACY_DROP

    def __post_init__(self) -> None:
        if not self.fid_ratio >= 1.0:
            raise ValueError(f"fid_ratio must be >= 1, got {self.fid_ratio!r}")
        if not 0.0 <= self.accuracy_drop <= 1.0:
            raise ValueError(f"accuracy_drop must be in [0, 1], got {self.accuracy_drop!r}")

    def matched(self, q: dict[str, Any], ref_q: dict[str, Any]) -> bool:
        """Whether quality ``q`` is within the band of the reference quality ``ref_q``."""
        # NB: a reference FID of exactly 0 (the real data against itself) admits only FID 0.
        return bool(q["fid"] <= self.fid_ratio * ref_q["fid"]
                    and q["accuracy"] >= ref_q["accuracy"] - self.accuracy_drop)

    def marginal(self, q: dict[str, Any], ref_q: dict[str, Any]) -> bool | None:
        """Whether the FID verdict is within draw-to-draw noise; ``None`` without several paired draws.

        Draw ``k`` of every model uses the same seeds, so its FIDs move together (one draw was
        lower for every model, measured); the verdict is judged on the per-draw ratios
        ``fid_k / ref_fid_k``: marginal when ``fid_ratio`` lies within two standard errors of
        their mean.
        """
        draws, ref_draws = q.get("fid_draws"), ref_q.get("fid_draws")
        if not draws or not ref_draws or len(draws) != len(ref_draws) or len(draws) < 2:
            return None
        ratios = torch.tensor(draws, dtype=torch.float64) / torch.tensor(ref_draws, dtype=torch.float64)
        se = float(ratios.std()) / len(draws) ** 0.5
        return bool(abs(float(ratios.mean()) - self.fid_ratio) <= 2 * se)

    def describe(self) -> dict[str, float]:
        return {"fid_ratio": self.fid_ratio, "accuracy_drop": self.accuracy_drop}


def quality_matched(q: dict[str, Any], ref_q: dict[str, Any], fid_ratio: float = DEFAULT_FID_RATIO,
                    accuracy_drop: float = DEFAULT_ACCURACY_DROP) -> bool:
    """FID at most ``fid_ratio`` x the reference's and accuracy at most ``accuracy_drop`` lower."""
    return QualityBand(fid_ratio, accuracy_drop).matched(q, ref_q)
