"""``un0-osc``: the published Un-0 reading, a population of coupled Kuramoto oscillators.

``N`` oscillators with phases ``theta_i`` and learned natural frequencies ``omega_i`` evolve as::

    d theta_i / dt = omega_i + sum_j K_ij sin(theta_j - theta_i) + sum_m C_im sin(phi_m - theta_i)

with a learned symmetric coupling matrix ``K`` (N x N) and a one-way coupling ``C = U V^T`` (rank
``r``) from ``M`` conditioning oscillators whose phases ``phi`` are learned per class (the prompt's
digit chooses them). Initial phases come from the image noise of the seed, through a small learned
projection, so the generator is a noise -> image map like every other generator here. The system is
integrated with ``steps`` forward-Euler steps over a fixed total time ``T`` (``dt = T / steps``),
and a digital decoder reads ``(cos theta, sin theta)`` out into a 16x16 image.

One step costs two real matrix products, not N^2 sines, by the identity::

    sum_j K_ij sin(theta_j - theta_i) = Im(e^{-i theta_i} sum_j K_ij e^{i theta_j})
                                     = cos(theta_i) (K sin theta)_i - sin(theta_i) (K cos theta)_i

The oscillators are laid out as ``n // 256`` channels on the 16x16 pixel grid, so the encoder and
the decoder are small convolutions and the coupling ``K`` carries all long-range interaction.

Energy: the harness counts this as what it is, a digital simulation. The claim is about analog
oscillator hardware, so :meth:`OscillatorGenerator.analog_projection` and
:func:`projected_energy` give a separate, labelled projection: the oscillator dynamics charged per
oscillator per step at the ``analog-oscillator`` profile's ``oscillator_step`` energy, the digital
parts (the ``encoder`` and ``decoder`` submodules, see :data:`DIGITAL_MODULES`) charged at the proxy
rate from their counted ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from un0_bench.backbones.digits import IMAGE_SHAPE, IMAGE_SIZE, prompt_labels, to_unit
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator, image_noise
from un0_bench.harness.core.spec import Param, takes
from un0_bench.harness.counters.records import Counts
from un0_bench.harness.errors import SpecError
from un0_bench.harness.meters.proxy import DEFAULT_PROFILE

__all__ = [
    "ANALOG_PROFILE",
    "DIGITAL_MODULES",
    "SHIPPED",
    "KuramotoDynamics",
    "OscillatorConfig",
    "OscillatorGenerator",
    "OscillatorNet",
    "PhaseDecoder",
    "PhaseEncoder",
    "build",
    "pack_state",
    "digital_counts",
    "load_oscillator",
    "naive_coupling",
    "projected_energy",
]

#: Shipped models: oscillator count -> weights name in ``backbones/weights/digits``.
SHIPPED: dict[int, str] = {1024: "un0-osc"}
#: Profile in ``harness/meters/profiles.csv`` giving the analog energy per oscillator per step.
ANALOG_PROFILE = "analog-oscillator"
#: Submodules of :class:`OscillatorNet` that stay digital on oscillator hardware (noise -> initial
#: phases, and the read-out of the final phases). Everything else is oscillator dynamics.
DIGITAL_MODULES = ("encoder", "decoder")
_PIXELS = IMAGE_SIZE * IMAGE_SIZE  # 256 oscillators per channel of the 16x16 layout


@dataclass(frozen=True)
class OscillatorConfig:
    """Architecture of an oscillator generator (stored in the weights' metadata and checked on load).

    Attributes:
        n: Number of oscillators; a multiple of 256 (``n // 256`` channels on the 16x16 grid).
        cond_oscillators: Conditioning oscillators ``M`` per class (their phases are learned).
        cond_rank: Rank ``r`` of the one-way coupling ``C = U V^T`` (N x M) from them.
        decoder_channels: Width of the convolutional read-out (at the 16x16 grid).
        total_time: Integration time ``T`` (dimensionless); ``dt = T / steps``.
        num_classes: Classes the conditioning phases are learned for (10 digits).
        image_channels: Channels of the decoded image (1: grey digits; 3: RGB).
        decoder_upsamples: 2x nearest upsamplings in the read-out, each followed by a 3x3 convolution
            that halves the width; the image is ``16 * 2**decoder_upsamples`` pixels square. 0 (the
            digits model) is the read-out the shipped weights were trained with.
    """

    n: int = 1024
    cond_oscillators: int = 16
    cond_rank: int = 8
    decoder_channels: int = 32
    total_time: float = 1.0
    num_classes: int = 10
    image_channels: int = 1
    decoder_upsamples: int = 0

    def __post_init__(self) -> None:
        if self.n < _PIXELS or self.n % _PIXELS:
            raise ValueError(f"n must be a positive multiple of {_PIXELS} (oscillator channels on the grid), "
                             f"got {self.n}")

    @property
    def channels(self) -> int:
        return self.n // _PIXELS

    @property
    def image_size(self) -> int:
        """Side of the decoded image in pixels."""
        return IMAGE_SIZE * 2**self.decoder_upsamples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhaseEncoder(nn.Module):
    """Digital: image noise ``(B, 1, 16, 16)`` -> initial phases ``(B, N)`` (a 3x3 conv and a bias)."""

    def __init__(self, cfg: OscillatorConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.channels, 3, padding=1, bias=False)
        # A learned mean phase per oscillator: the noise perturbs a learned starting pattern.
        self.phase_bias = nn.Parameter(torch.zeros(cfg.channels, IMAGE_SIZE, IMAGE_SIZE))
        with torch.no_grad():
            # NB: unit-variance noise and unit-norm 3x3 filters give phases of std ~1 rad: random
            # angles spread over most of the circle without wrapping many times.
            w = torch.randn_like(self.proj.weight)
            self.proj.weight.copy_(w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        theta = self.proj(noise) + self.phase_bias  # (B, C, 16, 16)
        return theta.flatten(1)  # (B, N)


class KuramotoDynamics(nn.Module):
    """The oscillator population: natural frequencies, coupling, conditioning, Euler integration.

    Everything inside this module is what analog oscillator hardware would do physically.
    """

    def __init__(self, cfg: OscillatorConfig, num_classes: int = 10) -> None:
        super().__init__()
        n, m, r = cfg.n, cfg.cond_oscillators, cfg.cond_rank
        self.total_time = cfg.total_time
        self.omega = nn.Parameter(torch.zeros(n))  # natural frequencies (rad per unit time)
        # NB: symmetric (reciprocal) coupling, as in the classical Kuramoto model. It halves what must
        # be stored; the trainer (training/oscillator.py) keeps it symmetric by projecting after every
        # optimizer step.
        k = torch.randn(n, n) / math.sqrt(n)
        self.coupling = nn.Parameter((k + k.T) / 2)  # K (N, N)
        self.cond_phase = nn.Parameter(torch.rand(num_classes, m) * 2 * math.pi)  # phi (classes, M)
        self.cond_u = nn.Parameter(torch.randn(n, r) / math.sqrt(r))  # U (N, r)
        self.cond_v = nn.Parameter(torch.randn(m, r) / math.sqrt(m))  # V (M, r)

    def drive(self, labels: torch.Tensor) -> torch.Tensor:
        """``C e^{i phi}`` of each image's class, real parts stacked over imaginary parts: ``(2B, N)``.

        The conditioning oscillators are one-way: they drive the population and are not driven, so
        in the frame where their phases are fixed their field on the population is a constant.
        """
        phi = self.cond_phase[labels]  # (B, M)
        low = torch.cat([torch.cos(phi), torch.sin(phi)]) @ self.cond_v  # (2B, r): V^T e^{i phi}
        return low @ self.cond_u.T  # (2B, N): U V^T e^{i phi}, real over imaginary

    def velocity(self, theta: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """``d theta / dt`` of all oscillators ``(B, N)``, given the conditioning ``field`` ``(2B, N)``.

        Per image: two matrix-vector products with K (N x N), 4 N^2 FLOPs, run as one matmul over the
        stacked (cos, sin) so K is read once per step; plus 5 N pointwise FLOPs (cos, sin, addcmul,
        mul, sub), as the counter charges them (the addmm bias add is not charged, as in torch).
        """
        b = theta.shape[0]
        cs = torch.cat([torch.cos(theta), torch.sin(theta)])  # (2B, N): Re, Im of e^{i theta}
        # K is symmetric, so (K e^{i theta})^T = e^{i theta}^T K; the conditioning field rides along
        # as the addmm bias.
        z = torch.addmm(field, cs, self.coupling)  # (2B, N): K e^{i theta} + C e^{i phi}
        # Im(e^{-i theta} z) = cos(theta) Im(z) - sin(theta) Re(z)
        return torch.addcmul(self.omega, cs[:b], z[b:]) - cs[b:] * z[:b]  # (B, N)

    def step(self, theta: torch.Tensor, field: torch.Tensor, dt: float) -> torch.Tensor:
        """One forward-Euler step: ``theta + dt * velocity`` (4 N^2 + 6 N FLOPs per image)."""
        return torch.add(theta, self.velocity(theta, field), alpha=dt)

    def forward(self, theta: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
        field = self.drive(labels)  # (2B, N), constant over the integration
        dt = self.total_time / steps
        for _ in range(steps):
            theta = self.step(theta, field, dt)
        return theta


class PhaseDecoder(nn.Module):
    """Digital read-out: final phases ``(B, N)`` -> ``(cos, sin)`` on the grid -> image ``(B, 1, 16, 16)``."""

    def __init__(self, cfg: OscillatorConfig) -> None:
        super().__init__()
        d = cfg.decoder_channels
        self.channels = cfg.channels
        layers: list[nn.Module] = [
            nn.Conv2d(2 * cfg.channels, d, 3, padding=1), nn.SiLU(),
            nn.Conv2d(d, d, 3, padding=1), nn.SiLU(),
        ]
        for _ in range(cfg.decoder_upsamples):  # (B, d, s, s) -> (B, d / 2, 2s, 2s)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(d, d // 2, 3, padding=1), nn.SiLU()]
            d //= 2
        # With no upsampling these are the digits read-out's layers net.0 .. net.4, as shipped.
        self.net = nn.Sequential(*layers, nn.Conv2d(d, cfg.image_channels, 3, padding=1))

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        grid = theta.view(-1, self.channels, IMAGE_SIZE, IMAGE_SIZE)  # (B, C, 16, 16)
        x = torch.cat([torch.cos(grid), torch.sin(grid)], dim=1)  # (B, 2C, 16, 16)
        return torch.tanh(self.net(x))  # (B, image_channels, S, S) in (-1, 1); S = 16 for digits


class OscillatorNet(nn.Module):
    """Encoder (digital) -> Kuramoto dynamics (oscillators) -> decoder (digital)."""

    def __init__(self, cfg: OscillatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PhaseEncoder(cfg)
        self.dynamics = KuramotoDynamics(cfg, cfg.num_classes)
        self.decoder = PhaseDecoder(cfg)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                phase: Callable[[str], AbstractContextManager[Any]] | None = None) -> torch.Tensor:
        """Image in [-1, 1] ``(B, 1, 16, 16)`` from noise ``(B, 1, 16, 16)`` and labels ``(B,)``.

        ``phase(name)`` wraps each part (``encode``, ``oscillate``, ``decode``: the generator's phase
        windows). The parts run inside this module's forward, so op counts keep their module paths
        (``OscillatorNet.encoder...``), which :func:`digital_counts` selects by.
        """
        phase = phase or (lambda name: contextlib.nullcontext())
        with phase("encode"):
            theta = self.encoder(noise)  # (B, N)
        with phase("oscillate"):
            theta = self.dynamics(theta, labels, steps)  # (B, N)
        with phase("decode"):
            return self.decoder(theta)


def naive_coupling(theta: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
    """Reference ``sum_j K_ij sin(theta_j - theta_i)`` with N^2 sines, for tests. ``theta`` ``(B, N)``."""
    diff = theta[:, None, :] - theta[:, :, None]  # (B, N_i, N_j): theta_j - theta_i
    return (coupling[None] * torch.sin(diff)).sum(-1)


# -- weights ---------------------------------------------------------------------------------------
# NB: K is stored as its upper triangle in float16 (N(N+1)/2 values, 1 MB at N = 1024) to keep the
# shipped file small; it is widened back to a float32 symmetric matrix on load, and the model runs in
# float32. Quality is measured on the stored (rounded) weights.


def pack_state(net: OscillatorNet) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    k = state.pop("dynamics.coupling")
    rows, cols = torch.triu_indices(k.shape[0], k.shape[0])
    state["dynamics.coupling_triu_f16"] = k[rows, cols].half()
    return state


def _unpack_state(state: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    state = dict(state)
    triu = state.pop("dynamics.coupling_triu_f16").float()
    rows, cols = torch.triu_indices(n, n)
    k = torch.zeros(n, n)
    k[rows, cols] = triu
    k[cols, rows] = triu
    state["dynamics.coupling"] = k
    return state


def _oscillator_config(path: Path, meta: dict[str, Any], n: int | None = None) -> OscillatorConfig:
    """The network config a checkpoint's metadata records, refused when it is not one (or not ``n`` oscillators)."""
    from un0_bench.harness.errors import CheckpointError

    cfg_dict = meta.get("config") or {}
    try:
        cfg = OscillatorConfig(**cfg_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not an oscillator checkpoint (config {cfg_dict!r}: {e})") from None
    if n is not None and cfg.n != n:
        raise CheckpointError(f"{path}: has {cfg.n} oscillators, expected {n}")
    return cfg


def load_oscillator(path: Path) -> tuple[OscillatorNet, dict[str, Any]]:
    """A trained :class:`OscillatorNet` in eval mode, with its metadata."""
    from un0_bench.harness.weights.checkpoints import load_checkpoint, load_into, unpacked

    state, meta = load_checkpoint(path)
    cfg = _oscillator_config(path, meta)
    net = OscillatorNet(cfg)
    load_into(net, unpacked(_unpack_state, state, path, cfg.n), path)
    return net.eval().requires_grad_(False), meta


# -- the generator ---------------------------------------------------------------------------------


class OscillatorGenerator(Generator):
    """Class-conditional images from a simulated population of coupled Kuramoto oscillators."""

    technique = "coupled-oscillators"

    def __init__(self, net: OscillatorNet, steps: int = 32, metadata: dict[str, Any] | None = None) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.net = net.eval().requires_grad_(False)
        self.steps = steps
        self.metadata = metadata or {}

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> GenerationResult:
        labels = prompt_labels(request.prompts)  # refuses bad prompts before any work
        out = []
        for first, prompts in request.batches():
            noise = image_noise(request.seed, first, len(prompts), IMAGE_SHAPE)  # (B, 1, 16, 16)
            # The three parts of OscillatorNet.forward, each its own phase window.
            x = self.net(noise, labels[first : first + len(prompts)], self.steps, phase=self.phase)
            out.append(to_unit(x))
        return GenerationResult(images=torch.cat(out), prompts=request.prompts,
                                info={"oscillator_steps_per_image": self.oscillator_steps_per_image})

    def phases(self) -> tuple[str, ...]:
        return ("encode", "oscillate", "decode")

    @property
    def oscillator_steps_per_image(self) -> int:
        """Oscillator-steps one image costs: (population + one class's conditioning oscillators) x steps."""
        # NB: the M conditioning oscillators of the prompted class run too (one-way drivers), so they
        # are charged like population oscillators.
        cfg = self.net.cfg
        return (cfg.n + cfg.cond_oscillators) * self.steps

    def describe(self) -> dict[str, Any]:
        cfg = self.net.cfg
        params = {name: sum(p.numel() for p in getattr(self.net, name).parameters())
                  for name in ("encoder", "dynamics", "decoder")}
        return {
            "technique": self.technique,
            "backbone": "digits",
            "oscillators": cfg.n,
            "conditioning_oscillators_per_class": cfg.cond_oscillators,
            "conditioning_rank": cfg.cond_rank,
            "integrator": "forward Euler",
            "steps": self.steps,
            "total_time": cfg.total_time,
            "dt": cfg.total_time / self.steps,
            "dtype": "float32",
            "parameters": sum(params.values()),
            "parameters_by_part": params,
            "digital_modules": list(DIGITAL_MODULES),
            "oscillator_steps_per_image": self.oscillator_steps_per_image,
        }

    def derivation(self) -> dict[str, Any] | None:
        return self.metadata or None

    def analog_projection(self, work: Counts | int, profile: str = ANALOG_PROFILE,
                          digital_profile: str = DEFAULT_PROFILE) -> dict[str, Any]:
        """A clearly labelled projection of this generator's energy onto analog oscillator hardware.

        The oscillator dynamics are charged per oscillator per integration step at the ``profile``'s
        ``oscillator_step`` energy (an assumption: such hardware does not exist yet); the digital parts
        (:data:`DIGITAL_MODULES`: noise -> initial phases, and the read-out) stay digital and are
        charged at the proxy rate of ``digital_profile`` from their counted ops.

        Args:
            work: The :class:`Counts` of a counting pass over this generator (gives the full
                projection), or a number of images (gives the oscillator part only).
            profile: Profile with the ``oscillator_step`` energy.
            digital_profile: Proxy profile for the digital ops.

        Returns:
            JSON-serialisable figures; with counts, ``projected_j_per_image`` = analog oscillator
            energy + proxy energy (FLOPs and bytes) of the digital ops, per image.
        """
        if isinstance(work, Counts):
            return projected_energy(self, work, digital_profile, profile)
        if isinstance(work, bool) or not isinstance(work, int) or work < 1:
            raise ValueError(f"work must be Counts or a positive number of images, got {work!r}")
        from un0_bench.harness.meters.proxy import get_profile

        prof = get_profile(profile)
        e_osc_j = prof.quantity("oscillator_step")
        per_image = self.oscillator_steps_per_image
        return {
            "label": "projected: analog oscillator hardware (not measured; the hardware does not exist yet)",
            "oscillator_steps": per_image,
            "oscillator_steps_total": per_image * work,
            "energy_per_oscillator_step_j": e_osc_j,
            "analog_j_per_image": per_image * e_osc_j,
            "analog_j": per_image * work * e_osc_j,
            "decoder": "digital (charged at the proxy rate from the counted ops of "
                       + " and ".join(DIGITAL_MODULES) + ")",
            "profile": profile,
            "assumption": prof.sources[("oscillator_step", "")],
        }


def digital_counts(counts: Counts) -> Counts:
    """Only the ops that ran inside the digital submodules (:data:`DIGITAL_MODULES`).

    Works whether the counter was given the net as ``root`` (paths ``decoder.net.0``) or not (paths
    ``OscillatorNet.decoder.net.0``).
    """
    def digital(path: str) -> bool:
        parts = path.split(".")
        return any(p in DIGITAL_MODULES for p in parts[:2])

    return Counts(images=counts.images, stats=[s for s in counts.stats if digital(s.module)])


def projected_energy(gen: OscillatorGenerator, counts: Counts, digital_profile: str = DEFAULT_PROFILE,
                     analog_profile: str = ANALOG_PROFILE) -> dict[str, Any]:
    """Projected energy on analog oscillator hardware: oscillators at the analog rate, the rest digital.

    Args:
        gen: The generator that produced the counted run.
        counts: A counting pass over ``counts.images`` images of ``gen``.
        digital_profile: Proxy profile charging the digital parts (encoder and decoder ops).
        analog_profile: Profile with the ``oscillator_step`` energy.

    Returns:
        The oscillator part (:meth:`OscillatorGenerator.analog_projection` of the image count) plus
        ``digital_j_per_image`` (proxy energy, FLOPs and bytes, of the digital ops only) and their
        sum ``projected_j_per_image``.
    """
    from un0_bench.harness.meters.proxy import proxy_energy

    analog = gen.analog_projection(counts.images, analog_profile)
    digital = digital_counts(counts)
    digital_j = proxy_energy(digital, digital_profile).total_j
    return {
        **analog,
        "projected_j_per_image": (analog["analog_j"] + digital_j) / counts.images,
        "digital_j_per_image": digital_j / counts.images,
        "digital_flops_per_image": digital.flops() / counts.images,
        "digital_bytes_per_image": digital.bytes_moved() / counts.images,
        "digital_profile": digital_profile,
    }


@takes(
    n=Param(int, 1024, f"oscillators; must match a trained model ({', '.join(map(str, sorted(SHIPPED)))})",
            low=1),
    steps=Param(int, 32, "Euler integration steps over the fixed time T (dt = T / steps)", low=1, high=100_000),
)
def build(backbone: Backbone, n: int, steps: int) -> Generator:
    """``un0-osc`` and ``un0-osc:n=1024,steps=32``."""
    if n not in SHIPPED:
        valid = ", ".join(str(k) for k in sorted(SHIPPED))
        raise SpecError(f"un0-osc:n={n}: no trained model has {n} oscillators; n must be one of {valid}")
    net, meta = load_oscillator(backbone.weights(SHIPPED[n]))
    _oscillator_config(backbone.weights(SHIPPED[n]), meta, n)
    return OscillatorGenerator(net, steps=steps, metadata=meta)


def _check_weights(backbone: Backbone, n: int, **params: Any) -> list[Path]:
    from un0_bench.harness.weights.checkpoints import check_checkpoint

    if n not in SHIPPED:
        return []  # build() refuses it with the valid sizes
    path = backbone.weights(SHIPPED[n])
    _oscillator_config(path, check_checkpoint(path), n)
    return [path]


build.check_weights = _check_weights  # type: ignore[attr-defined]
