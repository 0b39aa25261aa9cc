"""``un0-osc`` on ``arch:un0-*``: the published Un-0 sizes, built by the un0-osc code path on the meta device.

The shipped config ``backbones/archs/un0.json`` gives, per released size, the oscillator count and
the assumptions (grid layout, conditioning pool, decoder) under which :class:`OscillatorConfig`
and :class:`OscillatorNet` of :mod:`un0_bench.un0_impl.oscillator` (the model behind the digits
``un0-osc``) reach the published parameter counts. Nothing is trained or loaded: the network is
built on the meta device and counted, its Euler integration and decoder op by op.
"""

from __future__ import annotations

from typing import Any

import torch
from un0_bench.backbones.archs import ArchBackbone, parameters
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult
from un0_bench.harness.core.spec import Param, takes
from un0_bench.harness.errors import StackError
from un0_bench.un0_impl.oscillator import IMAGE_SIZE, OscillatorConfig, OscillatorGenerator, OscillatorNet

__all__ = ["PublishedOscillatorGenerator", "build_arch", "published_config", "published_net"]


def published_config(backbone: ArchBackbone) -> OscillatorConfig:
    """The :class:`OscillatorConfig` of an ``arch:un0-*`` backbone's released size."""
    if backbone.family != "oscillator":
        raise StackError(f"un0-osc on an arch backbone counts the published Un-0 sizes; {backbone.arch} is a "
                         f"{backbone.family} model (count it with sd)")
    return OscillatorConfig(**backbone.config["oscillator"])


def published_net(cfg: OscillatorConfig) -> OscillatorNet:
    """An :class:`OscillatorNet` of ``cfg`` on the meta device (no weights), in eval mode."""
    with torch.device("meta"):
        net = OscillatorNet(cfg)
    return net.eval().requires_grad_(False)


class PublishedOscillatorGenerator(OscillatorGenerator):
    """An oscillator generator of a published size, on meta tensors: counted, never run."""

    def __init__(self, net: OscillatorNet, backbone: ArchBackbone, steps: int) -> None:
        super().__init__(net, steps=steps)
        self.backbone = backbone

    def generate(self, request: GenerationRequest) -> GenerationResult:
        labels = [self.backbone.label(p) for p in request.prompts]  # refuses bad prompts before any work
        meta = torch.device("meta")
        dtype = next(self.net.parameters()).dtype
        out = []
        with torch.no_grad():
            for first, prompts in request.batches():
                b = len(prompts)
                # (B, 1, 16, 16): what the initial phases are drawn from
                noise = torch.empty(b, 1, IMAGE_SIZE, IMAGE_SIZE, device=meta, dtype=dtype)
                y = torch.tensor(labels[first: first + b]).to(meta)  # (B,)
                x = self.net(noise, y, self.steps, phase=self.phase)  # (B, 3, S, S) in (-1, 1)
                out.append((x + 1) / 2)
        return GenerationResult(images=torch.cat(out), prompts=request.prompts,
                                info={"oscillator_steps_per_image": self.oscillator_steps_per_image})

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        cfg = self.net.cfg
        by_part = {name: parameters(getattr(self.net, name)) for name in ("encoder", "dynamics", "decoder")}
        return {
            **d, "backbone": self.backbone.name, "arch": self.backbone.arch, "device": "meta",
            "image_size": cfg.image_size, "image_channels": cfg.image_channels, "num_classes": cfg.num_classes,
            "decoder_channels": cfg.decoder_channels, "decoder_upsamples": cfg.decoder_upsamples,
            "parameters_by_component": by_part, "parameters_total": sum(by_part.values()),
            "decoder_share_of_parameters": by_part["decoder"] / sum(by_part.values()),
            "assumptions": self.backbone.config.get("assumptions"),
        }


@takes(steps=Param(int, None, "explicit Euler steps (default: the arch's, 10 as released)", low=1, high=100_000))
def build_arch(backbone: ArchBackbone, steps: int | None = None) -> PublishedOscillatorGenerator:
    """``un0-osc`` on ``arch:un0-cifar10-1024`` ... ``arch:un0-imagenet64-16384``."""
    cfg = published_config(backbone)
    if cfg.image_size != backbone.resolution:
        raise StackError(f"{backbone.arch} decodes {cfg.image_size}x{cfg.image_size} images; --resolution "
                         f"{backbone.resolution} would need another decoder")
    net = nn_to(published_net(cfg), backbone.dtype)
    return PublishedOscillatorGenerator(net, backbone, steps or int(backbone.default_steps or 10))


def nn_to(net: OscillatorNet, dtype: torch.dtype) -> OscillatorNet:
    """``net`` cast to ``dtype`` (its parameters are meta tensors: only their dtype changes)."""
    return net.to(dtype) if dtype != torch.float32 else net
