"""Every built-in backbone, generator, technique, meter and training target: the one registration point.

This is the top floor: it names the concrete modules of every floor below, as lazy ``"module:attr"``
strings, so nothing heavy is imported until a name is chosen. The instrument (``harness/``) owns
the registries and knows none of these names.
"""

from __future__ import annotations

from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, TRAINERS

_B = "un0_bench.baselines"
_U = "un0_bench.un0_impl"
_NO_TRAINING = ("needs a training run on the pipeline's own data, out of scope here; the shipped weights exist "
                "for the digits teacher only")

# --- backbones ---------------------------------------------------------------------------------
BACKBONES.register("digits", "un0_bench.backbones.digits:DigitsBackbone", "sklearn handwritten digits, 16x16, CPU")
BACKBONES.register("diffusers", "un0_bench.backbones.pipeline:PipelineBackbone",
                   "diffusers:PATH, a text-to-image pipeline folder (Stable Diffusion and kin)")
BACKBONES.register("arch", "un0_bench.backbones.archs:ArchBackbone",
                   "arch:NAME, a published architecture built from its shipped config on the meta device "
                   "(counting only: un0-bench count)")
_NO_WEIGHTS = "an arch backbone has no weights (built on the meta device for counting)"

# --- techniques: transforms of a denoiser, stacked left to right on a base ---------------------
TECHNIQUES.register("int8", f"{_B}.int8:Int8", "int8 convolutions and linears (scales: static calibrated or dynamic)")
TECHNIQUES.register("bf16", f"{_B}.half:BFloat16", "denoiser weights and activations in bfloat16")
TECHNIQUES.register("fp16", f"{_B}.half:Float16", "denoiser weights and activations in float16")
TECHNIQUES.register("cached", f"{_B}.cached:DeepCache", "DeepCache: reuse the deep UNet features between full calls")
TECHNIQUES.register("deepcache", f"{_B}.deepcache:DeepCachePackage",
                    "DeepCache from its authors' package (DeepCacheSDHelper): shallow branch between full steps",
                    kinds=("diffusers",),
                    unsupported={"digits": "DeepCacheSDHelper indexes a diffusers pipeline's scheduler timesteps; "
                                           "the digits sampler is not a pipeline (cached is the same algorithm, "
                                           "checked against it)",
                                 "arch": "DeepCacheSDHelper reads each timestep's value, which a meta tensor has "
                                         "not (cached is the same algorithm)"})
TECHNIQUES.register("tome", f"{_B}.tome:TokenMerging", "token merging before self-attention (tomesd)",
                    unsupported={"digits": "tomesd merges tokens in transformer blocks (BasicTransformerBlock); "
                                           "the digits teacher's attention is AttnDownBlock2D's plain Attention, "
                                           "which it does not patch"})
TECHNIQUES.register("compiled", f"{_B}.compiled:Compiled", "torch.compile (inductor) of the denoiser's forward",
                    unsupported={"arch": "an arch backbone runs nothing to compile (meta tensors, counting only)"})
TECHNIQUES.register("pruned-unstructured", f"{_B}.pruned:MagnitudePruning",
                    "magnitude pruning, dense kernels (zeros still multiplied)",
                    unsupported={"arch": f"it ranks weights by magnitude and {_NO_WEIGHTS}; its dense kernels count "
                                         "the same work as sd anyway"})
TECHNIQUES.register("pruned", f"{_B}.pruned:ChannelPruning", "50% channel pruning, fine-tuned (shipped weights)",
                    kinds=("digits",), unsupported={"diffusers": f"structured pruning {_NO_TRAINING}",
                                                    "arch": f"it loads fine-tuned pruned weights and {_NO_WEIGHTS}"})
TECHNIQUES.register("distilled", f"{_B}.distilled:Distillation", "few-step student (shipped weights, 4 or 1 step)",
                    kinds=("digits",), unsupported={"diffusers": f"distillation {_NO_TRAINING} (use a published "
                                                                 "few-step pipeline folder as the backbone)",
                                                    "arch": f"it loads a trained student and {_NO_WEIGHTS} (count a "
                                                            "published few-step network instead: --arch sdxl-turbo)"})
TECHNIQUES.register("contextual", f"{_U}.contextual:ContextualSparsity",
                    "Un-0 contextual sparsity: per-prompt gated feed-forward units", kinds=("diffusers",),
                    unsupported={"digits": "the digits teacher has no feed-forward layers (attention only); "
                                           "un0 on digits is the trained gated generator",
                                 "arch": f"its gates are calibrated on the activations of real weights and "
                                         f"{_NO_WEIGHTS}"})

# --- generators: base models, and names that stand for stacks -----------------------------------
_BOTH = ("digits", "diffusers", "arch")
GENERATORS.register("sd", "un0_bench.harness.core.stack:diffusion_base",
                    "the backbone's diffusion model (digits teacher: DDIM, 50 steps; a pipeline as loaded; "
                    "an arch as configured)", kinds=_BOTH)
GENERATORS.register("sd-bf16", None, "sd in bfloat16", alias={k: "sd+bf16" for k in _BOTH})
GENERATORS.register("sd-fp16", None, "sd in float16 (slower than float32 on CPU)", alias={k: "sd+fp16" for k in _BOTH})
GENERATORS.register("sd-int8", None, "sd with int8 convolutions and linears",
                    alias={"digits": "sd+int8:scales=static", "diffusers": "sd+int8", "arch": "sd+int8"})
GENERATORS.register("sd-cached", None, "DeepCache-style reuse of deep UNet features",
                    alias={k: "sd+cached" for k in _BOTH})
GENERATORS.register("sd-pruned-unstructured", None, "50% magnitude-pruned, dense kernels (zero savings)",
                    alias={k: "sd+pruned-unstructured" for k in ("digits", "diffusers")},
                    unsupported={"arch": f"magnitude pruning ranks weights and {_NO_WEIGHTS}"})
GENERATORS.register("sd-pruned", None, "50% channel-pruned teacher, fine-tuned", alias={"digits": "sd+pruned"},
                    unsupported={"diffusers": f"structured pruning {_NO_TRAINING} (sd-pruned-unstructured shows "
                                              "what pruning without it saves: nothing)",
                                 "arch": f"it loads fine-tuned pruned weights and {_NO_WEIGHTS}"})
GENERATORS.register("sd-distilled", None, "few-step student distilled from the teacher",
                    alias={"digits": "sd+distilled"},
                    unsupported={"diffusers": f"distillation {_NO_TRAINING} (use a published few-step pipeline "
                                              "folder as the backbone)",
                                 "arch": f"it loads a trained student and {_NO_WEIGHTS} (count --arch sdxl-turbo, a "
                                         "published few-step network)"})
GENERATORS.register("un0", {"digits": f"{_U}.gated:build"},
                    "Un-0 reading 1: neuron-gated sparse generator (digits: trained; pipelines: contextual sparsity)",
                    alias={"diffusers": "sd+contextual"},
                    unsupported={"arch": f"un0 needs trained gates (digits) or gates calibrated on real activations "
                                         f"(pipelines: contextual), and {_NO_WEIGHTS}"})
GENERATORS.register("un0-osc", {"digits": f"{_U}.oscillator:build", "arch": f"{_U}.published:build_arch"},
                    "Un-0 reading 2: coupled Kuramoto oscillators (arch:un0-*: the published sizes, counted)",
                    unsupported={"diffusers": "the oscillator generator is a digits-world model trained from "
                                              "scratch; it has no counterpart inside a pretrained pipeline"})
GENERATORS.register("noise", {"digits": f"{_B}.references:build_noise"}, "uniform random images (quality floor)",
                    unsupported={"diffusers": "a quality floor for FID on digits; on a pipeline, quality is the "
                                              "CLIP score", "arch": "an arch backbone counts work; it has no quality"})
GENERATORS.register("real", {"digits": f"{_B}.references:build_real"}, "held-out real digits (quality ceiling)",
                    unsupported={"diffusers": "held-out real digits; a pipeline backbone has no reference image set",
                                 "arch": "an arch backbone counts work; it has no reference image set"})

# --- meters --------------------------------------------------------------------------------------


_M = "un0_bench.harness.meters"
METERS.register("wall", f"{_M}.wall:WallMeter", "monotonic clock; time only")
METERS.register("proxy", f"{_M}.proxy:ProxyMeter", "counted ops x energy per op (deterministic)")
METERS.register("rapl", f"{_M}.rapl:RaplMeter", "Linux powercap RAPL: CPU package and DRAM")
METERS.register("nvml", f"{_M}.nvml:NvmlMeter", "NVIDIA GPU energy counter via pynvml")
METERS.register("codecarbon", f"{_M}.codecarbon:CodecarbonMeter", "codecarbon offline tracker")
METERS.register("zeus", f"{_M}.zeus:ZeusMeter", "ML.ENERGY Zeus (cross-check of nvml/rapl; also AMD GPUs and "
                "Apple silicon, which the own meters lack); pip install 'un0-bench[zeus]'")

# --- training targets ----------------------------------------------------------------------------
#: Target -> ("module:attr" under un0_bench.training, the targets whose shipped weights it derives from,
#: one-line description). Registration order is training order (``train all``): parents first. A
#: derived model's metadata includes its parents' derivation energy (and the teacher pairs' cost).
TRAINING: dict[str, tuple[str, tuple[str, ...], str]] = {
    "teacher": ("teacher:train_teacher", (), "the digits teacher UNet (everything derives from it)"),
    "judge": ("judge:train_judge", (), "digits classifier: FID/KID features and accuracy"),
    "sd-int8": ("int8_calibration:calibrate_int8", ("teacher",), "int8 scales calibrated on real digits"),
    "sd-pruned": ("pruned:train_pruned", ("teacher",), "channel pruning + fine-tuning"),
    "sd-distilled": ("distilled:train_distilled", ("teacher",), "few-step students (4 and 1 step)"),
    "un0": ("un0:train_un0", ("teacher",), "gated sparse Un-0 student, on the teacher's pairs"),
    "un0-osc": ("oscillator:train_oscillator", ("teacher",), "coupled-oscillator Un-0, on the teacher's pairs"),
}
for _name, (_target, _parents, _about) in TRAINING.items():
    TRAINERS.register(_name, f"un0_bench.training.{_target}",
                      _about + (f" (from {', '.join(_parents)})" if _parents else ""))
