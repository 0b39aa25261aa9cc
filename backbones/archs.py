"""``arch:NAME``: real architectures built from shipped configs on the meta device, for counting only.

A config in ``backbones/archs/*.json`` (no weights) describes one published model: its denoiser,
text encoders and VAE as diffusers / transformers ``config.json`` dicts, its scheduler, default
steps, resolution and guidance, and a ``source`` naming where every number comes from. The
backbone builds each component with :func:`~un0_bench.backbones.hf.build_on_meta`: parameters are
meta tensors, so an SDXL UNet costs no memory, nothing is downloaded, and a forward pass runs no
arithmetic. What it does run, op by op with every shape, is what the project's counter records.

The sampler (:class:`ArchSampler`) is a :class:`~un0_bench.harness.core.technique.DenoiserGenerator`
like every other backbone's, so techniques apply exactly as on a pipeline (``sd+cached``,
``sd+int8``, ``sd:steps=20``, ``sd-fp16``); it follows the diffusers pipeline's ``__call__``:
prompt (and, with classifier-free guidance, negative prompt) through each text encoder, one
denoiser call per scheduler timestep with the conditional and unconditional halves batched
together (a batch of ``2B``: one call, both halves counted), the scheduler's own ``step``, and
the VAE decode. Techniques that need weights (calibrated gates, shipped students) and meters
that need a real run are refused on this backbone with the reason.

Public API (what projections build on)::

    from un0_bench.backbones.archs import ARCH_NAMES, count_arch
    record = count_arch("sd21", "sd", steps=50, resolution=768, guidance=7.5, dtype="fp16")
    record["flops_per_image"], record["bytes_per_image"], record["phases"]

``count_arch(arch, model=None, *, steps=None, resolution=None, batch_size=1, guidance=None,
dtype=None) -> dict`` returns one record in the schema of measured runs (``counts_fields`` keys,
a ``phases`` dict, ``phase_calls`` with every occurrence) with ``status: "counted"``, ``meter:
"count"`` and no energy or duration measured. ``model=None`` is the arch's own model (``sd`` for
diffusion models, ``un0-osc`` for the published Un-0 sizes, which :mod:`un0_bench.un0_impl`
builds through the same backbone).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.model import Model
from un0_bench.harness.core.technique import DenoiserGenerator
from un0_bench.harness.errors import PromptError, StackError, UserError
from un0_bench.harness.meters.proxy import DEFAULT_PROFILE

if TYPE_CHECKING:
    from un0_bench.harness.core.generator import Generator
    from un0_bench.harness.core.model import Plan

#: Folder of the shipped architecture configs.
ARCH_DIR = Path(__file__).parent / "archs"
#: Dtype names of ``--dtype``.
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Families: how an arch is sampled.
FAMILIES = ("text-to-image", "class-unet", "oscillator")
#: Meters that need a real run: none can watch work that a meta-device pass does not do.
_RUN_METERS = ("wall", "rapl", "nvml", "codecarbon")
#: Prompts of a text-to-image arch (the count does not depend on them: prompts are padded to the
#: tokenizer's full length, as the pipelines do).
TEXT_PROMPTS: tuple[str, ...] = ("a photograph of an astronaut riding a horse", "a red bicycle against a brick wall")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in: dicts merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@functools.lru_cache(maxsize=1)
def _all_archs() -> dict[str, dict[str, Any]]:
    """Every shipped arch config by name: ``extends`` resolved, ``variants`` expanded."""
    raw = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(ARCH_DIR.glob("*.json"))}
    out: dict[str, dict[str, Any]] = {}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        if name in seen:
            raise ValueError(f"arch configs extend each other in a circle: {' -> '.join((*seen, name))}")
        cfg = raw[name]
        if "extends" in cfg:
            cfg = _merge(resolve(cfg["extends"], (*seen, name)), {k: v for k, v in cfg.items() if k != "extends"})
            cfg.pop("variants", None)
        return cfg

    for stem in raw:
        cfg = resolve(stem)
        variants = cfg.pop("variants", None)
        if variants is None:
            out[cfg.get("name", stem)] = cfg
        else:
            for name, over in variants.items():
                title = f"{cfg.get('title', stem)}: {name}"
                out[name] = _merge(cfg, {"title": title, **over, "name": name})
    for name, cfg in out.items():
        if cfg.get("family") not in FAMILIES or "source" not in cfg:
            raise ValueError(f"arch {name}: needs a family ({', '.join(FAMILIES)}) and a source")
    return out


#: Names of the shipped architectures (``un0-bench count --arch NAME``, ``--backbone arch:NAME``).
ARCH_NAMES: tuple[str, ...] = tuple(_all_archs())


def arch_config(name: str) -> dict[str, Any]:
    """The config of arch ``name`` (a deep copy); an unknown name is answered with "did you mean"."""
    archs = _all_archs()
    if name not in archs:
        from un0_bench.harness.registry import unknown_name

        raise UserError(unknown_name("arch", name, archs))
    return copy.deepcopy(archs[name])


def parameters(module: nn.Module) -> int:
    """Parameters of a module (its weights held as buffers by int8 layers included)."""
    return sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers() if n.rpartition(".")[2] in ("weight", "bias"))


class ArchParts(nn.Module):
    """The components of one arch, as children named like the pipeline's components.

    The op counter is given this module as its root, so ops are attributed to ``unet.down_blocks.0``,
    ``text_encoder_2.text_model.encoder``, ``vae.decoder.up_blocks`` rather than to class names.
    """

    def __init__(self, components: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in components.items():
            self.add_module(name, module)


class ArchBackbone(Backbone):
    """A published architecture built from its shipped config on the meta device: counting only.

    Args:
        arg: The arch name (``NAME`` of ``arch:NAME``).
        dtype: ``fp32``, ``fp16`` or ``bf16`` for every component (default: the arch's, fp16 for
            the SD family as their model cards load them).
        resolution: Image side in pixels (default: the arch's); a multiple of the VAE factor 8
            for latent models.
        guidance: Classifier-free guidance scale (default: the arch's); above 1 doubles the
            denoiser batch, as diffusers pipelines do; class-conditional archs take none.
        device: Only ``cpu`` (or ``None``): the model lives on the meta device whatever is asked.
        prompts_file: Not used: counted work does not depend on the prompt text.

    Raises:
        UserError: For an unknown arch or a bad option.
    """

    kind = "arch"

    def __init__(self, arg: str | None, *, dtype: str | None = None, resolution: int | None = None,
                 guidance: float | None = None, device: str | None = None, prompts_file: Any = None) -> None:
        if not arg:
            raise UserError(f"the arch backbone needs an architecture: --backbone arch:NAME ({', '.join(ARCH_NAMES)})")
        if device not in (None, "cpu"):
            raise UserError(f"--device {device}: an arch backbone is built on the meta device for counting; it runs "
                            "nowhere (use --backbone diffusers:PATH with weights to run on a GPU)")
        self.arch = arg
        self.name = f"arch:{arg}"
        self.config = cfg = arch_config(arg)
        self.family: str = cfg["family"]
        defaults = cfg.get("defaults", {})
        self.dtype_name = dtype or defaults.get("dtype", "fp32")
        if self.dtype_name not in _DTYPES:
            raise UserError(f"--dtype {self.dtype_name!r}: expected one of {', '.join(_DTYPES)}")
        self.dtype = _DTYPES[self.dtype_name]
        self.resolution = int(resolution if resolution is not None else defaults.get("resolution", 0))
        self.guidance = guidance if guidance is not None else defaults.get("guidance")
        self.default_steps: int | None = defaults.get("steps")
        self.num_classes = int(cfg.get("num_classes", 0))
        if self.family == "text-to-image":
            if self.resolution < 8 or self.resolution % 8:
                raise UserError(f"--resolution {self.resolution}: {arg} needs a positive multiple of 8 "
                                "(its VAE downsamples 8x)")
        elif self.family == "class-unet":
            native = int(cfg["denoiser"]["config"]["sample_size"])
            if self.resolution < 8 or self.resolution % 8:
                raise UserError(f"--resolution {self.resolution}: {arg} needs a positive multiple of 8 "
                                f"(its UNet downsamples 8x; trained at {native})")
            if guidance not in (None, 0.0, 1.0):
                raise UserError(f"--guidance {guidance:g}: {arg} is counted unguided, as its published FID was "
                                "sampled (no classifier or classifier-free guidance)")
            self.guidance = None
        if self.guidance is not None and self.guidance < 0:
            raise UserError(f"--guidance {self.guidance:g}: must be 0 or more")

    # -- prompts ---------------------------------------------------------------------------------

    def check_prompt(self, prompt: str) -> None:
        if self.family == "text-to-image":
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptError(f"empty prompt {prompt!r}; accepted prompts: any non-empty text (the count pads "
                                  "every prompt to the tokenizer's length, so it does not depend on the text)")
            return
        self.label(prompt)

    def label(self, prompt: str) -> int:
        """The class index of a class-conditional prompt: ``"class N"`` or ``"N"``, 0 <= N < classes."""
        text = prompt.strip().removeprefix("class").strip() if isinstance(prompt, str) else ""
        if not text.isdigit() or not 0 <= int(text) < self.num_classes:
            raise PromptError(f"prompt {prompt!r}: {self.arch} is class-conditional; accepted prompts: 'class N' or "
                              f"'N' with 0 <= N < {self.num_classes}")
        return int(text)

    def default_prompts(self, n: int) -> list[str]:
        if self.family == "text-to-image":
            return [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(n)]
        return [f"class {i % self.num_classes}" for i in range(n)]

    def describe(self) -> dict[str, Any]:
        blob = json.dumps(self.config, sort_keys=True).encode()
        return {
            "kind": self.kind, "arch": self.arch, "title": self.config.get("title"), "family": self.family,
            "source": self.config["source"], "resolution": self.resolution, "guidance": self.guidance,
            "dtype": self.dtype_name, "default_steps": self.default_steps, "device": "meta",
            "config_sha256": hashlib.sha256(blob).hexdigest(),
            "note": "built from a shipped config on the meta device: no weights, nothing runs; counting only",
        }

    def unmeasurable(self) -> str | None:
        return (f"{self.name} is built on the meta device without weights: nothing runs, so the meters that "
                f"watch a run ({', '.join(_RUN_METERS)}) have nothing to measure, and the proxy would price a "
                f"count, not a run. Count its work with `un0-bench count --arch {self.arch}`")

    # -- the base diffusion model and its sampler ------------------------------------------------

    def _check_diffusion(self) -> None:
        if self.family == "oscillator":
            raise StackError(f"{self.arch} is an oscillator population, not a diffusion model; its model is "
                             f"un0-osc (un0-bench count --arch {self.arch} --models un0-osc)")

    def plan_base(self, steps: int | None) -> Plan:
        from un0_bench.harness.core.model import Plan

        self._check_diffusion()
        return Plan("arch", self.config["denoiser"]["class"], steps or self.default_steps, weights="none (meta device)")

    def build(self, section: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
        """One component (``{"class", "config"}``) on the meta device, in ``dtype`` (default: the backbone's)."""
        from un0_bench.backbones.hf import build_on_meta

        module = build_on_meta(section["class"], section["config"])
        return nn.Module.to(module, dtype=dtype or self.dtype)

    def base_model(self, steps: int | None) -> Model:
        self._check_diffusion()
        cfg = self.config
        denoiser = self.build(cfg["denoiser"])
        parts: dict[str, nn.Module] = {}
        for enc in cfg.get("text_encoders", []):
            parts[enc["component"]] = self.build(enc)
        if "vae" in cfg:
            upcast = bool(cfg["vae"]["config"].get("force_upcast")) and self.dtype == torch.float16
            # NB: SDXL's VAE overflows in float16; its pipeline upcasts it to float32 to decode (force_upcast).
            parts["vae"] = self.build(cfg["vae"], torch.float32 if upcast else None)
        return Model(denoiser=denoiser, steps=int(steps or self.default_steps or 1), host=parts)

    def sampler(self, model: Model) -> Generator:
        return ArchSampler(model, self)


class ArchSampler(DenoiserGenerator):
    """A diffusers pipeline's ``__call__``, followed step by step on meta tensors.

    Phases: one per text encoder (named by its component, ``text_encoder`` and ``text_encoder_2``),
    ``denoise_step`` around every denoiser call, ``vae_decode``. With guidance above 1 (diffusers'
    rule for classifier-free guidance) each denoiser call carries the unconditional and conditional
    latents together, a batch of ``2B``; the text encoders also run on the empty negative prompt
    unless the arch uses zero embeddings for it (SDXL's ``force_zeros_for_empty_prompt``).
    """

    def __init__(self, model: Model, backbone: ArchBackbone) -> None:
        self.backbone = backbone
        self.cfg = backbone.config
        parts: dict[str, nn.Module] = dict(model.host or {})
        model.denoiser.eval().requires_grad_(False)
        super().__init__(model)
        self.encoders = [(enc, parts[enc["component"]]) for enc in self.cfg.get("text_encoders", [])]
        #: A transformer denoiser (PixArt) takes the timestep by keyword, per batch row.
        self.transformer = "Transformer" in type(model.denoiser).__name__
        self.vae = parts.get("vae")
        self.parts = ArchParts({self.cfg["denoiser"].get("component", "unet"): model.denoiser, **parts})
        self._memo: dict[tuple, tuple[list, Any]] = {}
        #: Replay identical denoiser calls from their counts (False: run every call; same counts, slower).
        self.memoize = True
        self.memo_hits = 0
        self._forward = model.denoiser.forward
        # The denoiser's hooks (phases, every technique's) still run on each call; only its forward body
        # is replayed when an identical call was counted before (see _memo_forward).
        model.denoiser.forward = self._memo_forward

    def close(self) -> None:
        super().close()
        if "forward" in vars(self.model.denoiser):
            del self.model.denoiser.forward  # back to the class's method

    def _memo_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The denoiser's forward, counted once per distinct call and replayed from the counts after.

        On the meta device tensors hold no values, so what a forward executes is fixed by its inputs'
        shapes and dtypes and by the modules it runs: a repeated call (every step of a plain sampler)
        executes the very same ops. The first such call runs under the counter; later ones add its
        counted ops again and return fresh tensors of the same shapes, which turns minutes of meta
        dispatch into seconds. A technique that changes the work between calls does it by changing
        modules (DeepCache swaps its deep blocks for stubs) or inputs, and either changes the key.
        """
        from un0_bench.harness.counters.ops import OpCounter, current_counter

        counter = current_counter()
        if counter is None or not self.memoize:
            with FusedAttention():
                return self._forward(*args, **kwargs)
        key = (_structure(self.model.denoiser), _signature((args, kwargs)))
        hit = self._memo.get(key)
        if hit is None:
            before = counter.snapshot()
            with FusedAttention():
                out = self._forward(*args, **kwargs)
            self._memo[key] = (OpCounter.since(before, counter.snapshot()), out)
            return out
        stats, out = hit
        counter.add(stats)
        self.memo_hits += 1
        return _fresh(out)

    @property
    def cfg_guided(self) -> bool:
        g = self.backbone.guidance
        return self.backbone.family == "text-to-image" and g is not None and g > 1.0

    def backbone_phases(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(enc["component"] for enc, _ in self.encoders), (("vae_decode",) if self.vae is not None else ())

    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        for p in prompts:
            self.backbone.check_prompt(p)

    def scheduler(self) -> Any:
        from un0_bench.backbones.hf import scheduler_from_config

        s = scheduler_from_config(self.cfg["scheduler"])
        s.set_timesteps(self.model.steps)
        return s

    def _encode(self, batch: int) -> dict[str, Any]:
        """Run the text encoders as the pipeline does; the denoiser's conditioning kwargs."""
        meta = torch.device("meta")
        runs = 2 if self.cfg_guided and self.cfg.get("negative_prompt_encoded", True) else 1
        hidden, pooled = [], None
        for enc, module in self.encoders:
            ids = torch.zeros(batch, int(enc.get("max_length", 77)), dtype=torch.long, device=meta)  # (B, 77)
            for _ in range(runs):  # prompt, then the empty negative prompt
                with self.phase(enc["component"]), FusedAttention():
                    # NB: T5 runs without its attention mask here (it masks padded positions: same FLOPs).
                    out = module(ids, output_hidden_states=True) if len(self.encoders) > 1 else module(ids)
            if len(self.encoders) > 1:
                # SDXL: the penultimate layer of each encoder, concatenated; the pooled projection of the last.
                hidden.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", pooled)
            else:
                hidden.append(out[0])  # last_hidden_state (B, 77, D)
        emb = torch.cat(hidden, dim=-1).to(self.backbone.dtype)  # (B, L, D)
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb}
        if any(enc.get("attention_mask") for enc, _ in self.encoders):
            # The transformer masks the padded text tokens in its cross-attention (PixArt).
            kwargs["encoder_attention_mask"] = torch.ones(emb.shape[:2], dtype=self.backbone.dtype).to(meta)
        if self.transformer:
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        if self.model.denoiser.config.get("addition_embed_type") == "text_time":
            r = self.backbone.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=self.backbone.dtype).to(meta)  # (B, 6)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.backbone.dtype), "time_ids": time_ids}
        if self.cfg_guided:
            # Negative first, as the pipelines concatenate; zeros when the arch does not encode it.
            kwargs = _double(kwargs)
        return kwargs

    def sample_batch(self, prompts: tuple[str, ...], seed: int, first: int) -> torch.Tensor:
        b = len(prompts)
        meta, dtype = torch.device("meta"), self.backbone.dtype
        denoiser = self.model.denoiser
        if self.backbone.family == "text-to-image":
            cond = self._encode(b)
            f = 2 ** (len(self.vae.config.block_out_channels) - 1)
            side = self.backbone.resolution // f
            shape = (b, int(denoiser.config.in_channels), side, side)  # (B, C, h, w) latents
        else:
            labels = torch.tensor([self.backbone.label(p) for p in prompts]).to(meta)  # (B,)
            cond = {"class_labels": labels}
            side = self.backbone.resolution
            shape = (b, int(denoiser.config.in_channels), side, side)  # (B, 3, H, W) pixels
        scheduler = self.scheduler()
        # NB: on the meta device tensors hold no values, so the seed cannot matter; the shapes are those of
        # the pipeline's own latents.
        x = torch.empty(shape, device=meta, dtype=dtype) * scheduler.init_noise_sigma
        g = self.backbone.guidance
        learned_sigma = int(denoiser.config.get("out_channels") or 0) == 2 * shape[1]
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if self.cfg_guided else x  # (2B or B, C, h, w)
            x_in = scheduler.scale_model_input(x_in, t)
            if self.transformer:  # as PixArt's pipeline: one timestep per batch row, on the latents' device
                out = denoiser(x_in, timestep=t.expand(x_in.shape[0]).to(meta), **cond, return_dict=False)[0]
            else:
                out = denoiser(x_in, t, **cond, return_dict=False)[0]
            if learned_sigma and self.backbone.family == "text-to-image":
                out = out.chunk(2, dim=1)[0]  # the pipeline keeps the mean prediction, drops the variance
            if self.cfg_guided:
                uncond, text = out.chunk(2)
                out = uncond + g * (text - uncond)
            x = scheduler.step(out, t, x, return_dict=False)[0]
        if self.vae is not None:
            with self.phase("vae_decode"), FusedAttention():
                z = x.to(next(self.vae.parameters()).dtype) / self.vae.config.scaling_factor
                x = self.vae.decode(z, return_dict=False)[0]  # (B, 3, H, W) in about [-1, 1]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        return {
            **d, "backbone": self.backbone.name, "arch": self.backbone.arch,
            "scheduler": self.cfg["scheduler"]["_class_name"],
            "guidance_scale": self.backbone.guidance, "resolution": self.backbone.resolution,
            "denoiser_batch": "2B: unconditional and conditional halves in one call" if self.cfg_guided else "B",
            "parameters_by_component": {name: parameters(m) for name, m in self.parts.named_children()},
            "pipeline_dtype": self.backbone.dtype_name, "device": "meta",
        }


class FusedAttention(torch.overrides.TorchFunctionMode):
    """Attention on meta tensors counted as the fused kernel a GPU (or a CPU) runs, not its math decomposition.

    On real tensors ``F.scaled_dot_product_attention`` dispatches to a fused kernel (flash or memory-
    efficient on CUDA, flash on CPU) that computes in the inputs' dtype and never writes the
    ``S x S`` score matrix. On the meta device there is no fused kernel to choose, so torch falls back
    to the math path: the scores in float32, written out and read back (about 1 GB per attention
    layer of SD 1.5 at 64x64 latents). This mode sends attention on meta tensors (unmasked, or with
    an additive mask of the inputs' dtype) to the CPU flash kernel's op, whose FLOPs the counter
    charges as ``Q K^T`` plus ``P V`` (4 B H Sq Skv D) and whose bytes are q, k, v and the output, as
    in a measured run on CPU.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            rest = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:], strict=False), **kwargs)
            mask = rest.get("attn_mask")
            if (q.device.type == "meta" and not rest.get("dropout_p") and not rest.get("enable_gqa")
                    and q.shape[-1] == v.shape[-1] and (mask is None or mask.dtype == q.dtype)):
                # NB: softmax, scaling and an additive mask are not counted, as in torch's sdpa formula.
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, bool(rest.get("is_causal", False)), attn_mask=mask, scale=rest.get("scale"))[0]
        return func(*args, **kwargs)


def _structure(module: nn.Module) -> tuple:
    """Which modules a forward would run, and their parameters' dtypes: part of a call's memo key."""
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        out.append((id(m), tuple(p.dtype for p in m._parameters.values() if p is not None)))
        stack.extend(c for c in m._modules.values() if c is not None)
    return tuple(out)


def _signature(obj: Any) -> Any:
    """Shapes and dtypes of every tensor in ``obj`` (nested), other values as they are: a hashable key."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device.type)
    if isinstance(obj, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in sorted(obj.items())))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_signature(v) for v in obj))
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return obj


def _fresh(out: Any) -> Any:
    """New meta tensors shaped like those in ``out`` (made outside the counter: no ops are counted)."""
    from torch.utils._python_dispatch import _disable_current_modes
    from torch.utils._pytree import tree_map

    with _disable_current_modes():
        return tree_map(lambda t: torch.empty_like(t) if isinstance(t, torch.Tensor) else t, out)


def _double(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Conditioning for a ``2B`` denoiser batch: each tensor twice along the batch (negative, prompt)."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        out[k] = _double(v) if isinstance(v, dict) else torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
    return out


# --- counting -------------------------------------------------------------------------------------


def _with_steps(model: str, steps: int | None) -> str:
    """``model`` with ``steps=N`` on its base layer (refused when the text already sets steps)."""
    if steps is None:
        return model
    base, plus, rest = model.partition("+")
    if "steps=" in base:
        raise UserError(f"--steps {steps} and {base!r} both set the steps; give them once")
    base += (",steps=" if ":" in base else ":steps=") + str(steps)
    return base + plus + rest


def default_model(arch: str) -> str:
    """The model an arch is counted as when none is named: ``un0-osc`` for oscillators, else ``sd``."""
    return "un0-osc" if arch_config(arch)["family"] == "oscillator" else "sd"


def count_arch(arch: str, model: str | None = None, *, steps: int | None = None, resolution: int | None = None,
               batch_size: int = 1, guidance: float | None = None, dtype: str | None = None,
               profile: str = DEFAULT_PROFILE) -> dict[str, Any]:
    """Count one batch of ``arch`` under stack ``model`` on the meta device: one record, ``status: "counted"``.

    Args:
        arch: One of :data:`ARCH_NAMES`.
        model: A stack as in ``compare`` (``sd``, ``sd+cached``, ``sd-int8``, ``sd:steps=20``);
            ``None``: the arch's own (:func:`default_model`).
        steps: Sampling steps (default: the arch's); put on the stack's base layer.
        resolution: Image side in pixels (default: the arch's).
        batch_size: Images per sampler run; the record is per image.
        guidance: Classifier-free guidance scale (default: the arch's; above 1 doubles the denoiser
            batch: one call per step carrying both halves, whose FLOPs are both counted).
        dtype: ``fp32``, ``fp16`` or ``bf16`` for every component (default: the arch's).
        profile: Proxy profile for the ``proxy_j_*`` fields (counted ops x energy per op: a price,
            not a measurement).

    Returns:
        A record with the fields of a measured run's counts (``flops_per_image``,
        ``bytes_per_image``, ``flops_per_image_by_dtype``, ``proxy_j_per_image_by_module``, ...),
        ``phases`` (per phase: calls and counted work of the whole batch, like measured records),
        ``phase_calls`` (every occurrence in order), ``kernels`` (launched kernels of the whole batch by
        phase: ``[phase, class, dtype, launches, FLOPs per launch, bytes per launch]``), ``arch``, ``steps``,
        ``denoiser_calls_per_image``, ``resolution``, ``guidance``, ``batch_size``, ``dtype``, ``parameters``,
        ``published_*`` and
        ``count_wall_s`` (CPU time the count took). ``energy_j_per_image`` and
        ``duration_s_per_image`` are ``None``: nothing was measured.

    Raises:
        UserError: Bad arch, option or stack (techniques that need weights are refused with the reason).
    """
    from un0_bench.harness.core.generator import GenerationRequest
    from un0_bench.harness.core.stack import build, resolve
    from un0_bench.harness.measuring.environment import environment
    from un0_bench.harness.measuring.protocol import count_phase_occurrences

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size {batch_size!r}: must be a positive integer")
    backbone = ArchBackbone(arch, dtype=dtype, resolution=resolution, guidance=guidance)
    text = _with_steps(model or default_model(arch), steps)
    stack = resolve(text, backbone)
    t0 = time.perf_counter()
    gen = build(stack, backbone)
    request = GenerationRequest(tuple(backbone.default_prompts(batch_size)), seed=0, batch_size=batch_size)
    root = getattr(gen, "parts", None)
    root = root if root is not None else getattr(gen, "net", None)
    counts, occurrences = count_phase_occurrences(gen, request, root=root)
    count_s = time.perf_counter() - t0
    return counted_record(gen, stack, backbone, counts, occurrences, text=text, batch_size=batch_size,
                          count_s=count_s, profile=profile, env=environment())


def _kernels_by_phase(counts: Any, occurrences: list, exact: bool = False) -> list[list[Any]]:
    """Launched kernels of the whole batch by phase (``un0_bench.harness.counters.kernels.kernel_groups`` rows).

    Work outside every phase (the sampler's arithmetic) is the phase ``other``: the total's op groups
    less what the phase occurrences counted.
    """
    from un0_bench.harness.counters.kernels import kernel_groups
    from un0_bench.harness.counters.records import OpStat

    # NB: occurrences of a phase with the same number of op groups and the same totals (the replayed
    # denoiser calls of a sampler) are summed once and multiplied; if that ever leaves a negative
    # remainder for `other`, everything is summed again occurrence by occurrence (`exact`).
    distinct: dict[tuple, list] = {}
    for phase, stats in occurrences:
        key = (phase, len(stats)) if exact else (phase, len(stats), sum(s.calls for s in stats),
                                                 sum(s.flops for s in stats), sum(s.bytes_read for s in stats),
                                                 sum(s.bytes_written for s in stats))
        if exact:
            key = (*key, len(distinct))
        entry = distinct.setdefault(key, [stats, 0])
        entry[1] += 1
    by_phase: dict[str, dict[tuple, list[int]]] = {}
    left = {(s.op, s.dtype, s.role, s.module): [s.calls, s.flops, s.bytes_read, s.bytes_written]
            for s in counts.stats}
    for (phase, *_), (stats, times) in distinct.items():
        groups = by_phase.setdefault(phase, {})
        for s in stats:
            key = (s.op, s.dtype, s.role, s.module)
            g = groups.setdefault(key, [0, 0, 0, 0])
            for i, v in enumerate((s.calls, s.flops, s.bytes_read, s.bytes_written)):
                g[i] += v * times
                left[key][i] -= v * times
    if not exact and any(v < 0 for g in left.values() for v in g):
        return _kernels_by_phase(counts, occurrences, exact=True)
    by_phase["other"] = left
    rows: list[list[Any]] = []
    for phase, groups in by_phase.items():
        rows += kernel_groups([OpStat(*k, calls=g[0], flops=g[1], bytes_read=g[2], bytes_written=g[3])
                               for k, g in groups.items() if g[0] > 0], phase)
    return rows


def counted_record(gen: Generator, stack: Any, backbone: ArchBackbone, counts: Any, occurrences: list,
                   *, text: str, batch_size: int, count_s: float, profile: str, env: dict[str, Any]
                   ) -> dict[str, Any]:
    """The record of one counting pass (see :func:`count_arch`)."""
    from un0_bench.harness.counters.records import Counts
    from un0_bench.harness.measuring.protocol import counts_fields, module_groups
    from un0_bench.harness.meters.proxy import proxy_energy

    n = counts.images
    desc = gen.describe()
    phases: dict[str, dict[str, Any]] = {}
    calls: list[dict[str, Any]] = []
    for i, (phase, stats) in enumerate(occurrences):
        c = Counts(images=n, stats=stats)
        flops, moved, proxy_j = c.flops(), c.bytes_moved(), proxy_energy(c, profile).total_j
        calls.append({"index": i, "phase": phase, "flops": flops, "bytes": moved})
        p = phases.setdefault(phase, {"calls": 0, "flops": 0, "bytes": 0, "gating_flops": 0, "duration_s": None,
                                      "energy_j": {"proxy": 0.0}, "status": {"proxy": "ok"}, "below_resolution": []})
        p["calls"] += 1
        p["flops"] += flops
        p["bytes"] += moved
        p["gating_flops"] += c.flops("gating")
        p["energy_j"]["proxy"] += proxy_j
    kernels = _kernels_by_phase(counts, occurrences)
    accounted = sum(p["flops"] for p in phases.values())
    accounted_bytes = sum(p["bytes"] for p in phases.values())
    phases["other"] = {"calls": 1, "flops": counts.flops() - accounted, "bytes": counts.bytes_moved() - accounted_bytes,
                       "gating_flops": 0, "duration_s": None, "status": {"proxy": "ok"}, "below_resolution": [],
                       "energy_j": {"proxy": proxy_energy(counts, profile).total_j
                                    - sum(p["energy_j"]["proxy"] for p in phases.values())}}
    for p in phases.values():
        p["flops_per_image"] = p["flops"] / n
        p["bytes_per_image"] = p["bytes"] / n
    cfg = backbone.config
    denoise = phases.get("denoise_step", {})
    steps = desc.get("steps", desc.get("oscillator_steps"))
    return {
        "model": text,
        "model_canonical": stack.canonical,
        "stack": stack.describe(),
        "backbone": backbone.name,
        "arch": backbone.arch,
        "title": cfg.get("title"),
        "steps": steps,
        "denoiser_calls_per_batch": denoise.get("calls") if denoise else None,
        "denoiser_batch_per_image": desc.get("denoiser_batch"),
        "resolution": backbone.resolution,
        "guidance": backbone.guidance,
        "batch_size": batch_size,
        "dtype": backbone.dtype_name,
        "images": n,
        "meter": "count",
        "status": "counted",
        "label": "counted on the meta device (no weights, no arithmetic): work, not a measurement",
        "energy_j_per_image": None,
        "energy_ci95_j": None,
        "duration_s_per_image": None,
        "count_wall_s": count_s,
        **counts_fields(counts, profile),
        "flops_per_image_by_module": {g: c.flops() / n for g, c in module_groups(counts).items()},
        "bytes_per_image_by_module": {g: c.bytes_moved() / n for g, c in module_groups(counts).items()},
        "phases": phases,
        "phase_calls": calls,
        "kernels": kernels,
        "parameters": desc.get("parameters_by_component") or {"total": desc.get("parameters")},
        "parameters_total": desc.get("parameters_total", desc.get("parameters")),
        "published_parameters": cfg.get("published_parameters"),
        "published_fid50k": cfg.get("published_fid50k"),
        "source": cfg["source"],
        "config": {"generator": desc, "arch": backbone.describe(),
                   "count": {"steps": steps, "resolution": backbone.resolution, "guidance": backbone.guidance,
                             "batch_size": batch_size, "dtype": backbone.dtype_name, "profile": profile}},
        "environment": env,
        "counted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
