"""``diffusers:PATH``: any diffusers text-to-image pipeline in a local folder, as a backbone.

It loads a pipeline with ``DiffusionPipeline.from_pretrained`` (through :mod:`un0_bench.backbones.hf`, the one
module that imports diffusers and transformers) with ``local_files_only=True`` for a folder, so
nothing is ever downloaded (a hub id is tried only when the text is not a local path), checks that
it is a text-to-image pipeline with a ``unet`` or ``transformer`` denoiser, places it on the chosen
device and dtype, and owns the prompts: free text up to the tokenizer's limit, from a ``--prompts``
file or a small built-in list.

It also scores images against their prompts with a local CLIP model (:func:`clip_quality`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from un0_bench.backbones.hf import (
    diffusers_class,
    from_pretrained_dtype_key,
    text2image_pipeline_classes,
    transformers_class,
)
from un0_bench.backbones.pipeline_parts import (  # noqa: F401  (re-exported for the techniques)
    _TEXT_ENCODER,
    DTYPES,
    call_defaults,
    denoiser_of,
    dtype_label,
    feed_forward_layers,
    text_encoders_of,
)
from un0_bench.harness.core.backbone import Backbone, QualityOptions
from un0_bench.harness.errors import PromptError, UserError

if TYPE_CHECKING:
    from un0_bench.harness.core.generator import GenerationResult, Generator
    from un0_bench.harness.core.model import Model, Plan


#: Prompts of a benchmark run when no ``--prompts`` file is given (cycled over).
BUILTIN_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a red bicycle leaning against a brick wall",
    "a bowl of ramen on a wooden table, studio lighting",
    "a lighthouse on a cliff at sunset, oil painting",
    "a close-up portrait of an old fisherman",
    "a snowy mountain village at night",
    "a cat sleeping on a stack of books",
    "a futuristic city skyline in the rain",
)

#: Prompts that un0 records activations on to fit its gates: disjoint from :data:`BUILTIN_PROMPTS`
#: so the gates are not fitted on the prompts they are measured on.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a golden retriever playing in the snow",
    "a vase of sunflowers on a windowsill",
    "a sailing boat on a calm lake at dawn",
    "an isometric illustration of a tiny island",
    "a bustling market street in the evening",
    "a watercolor painting of a fox in a forest",
    "a plate of pancakes with berries and syrup",
    "a vintage car parked in front of a diner",
    "a macro photograph of a dragonfly",
    "a medieval castle surrounded by fog",
    "a child flying a kite on a beach",
    "a robot reading a newspaper in a cafe",
    "a desert landscape with cacti under a starry sky",
    "a pencil sketch of a cathedral interior",
    "a green parrot sitting on a branch",
    "a cup of coffee with latte art, top view",
)

#: A tokenizer whose ``model_max_length`` is above this has no real limit (transformers' sentinel is 1e30).
_NO_LIMIT = 1_000_000


def parse_device(text: str) -> str:
    """Check a ``--device`` value: ``cpu``, ``cuda`` or ``cuda:N`` (the device must be visible)."""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", text or "")
    if m is None:
        raise UserError(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
        index = int(m.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return text


def parse_dtype(text: str) -> torch.dtype:
    """``fp32``, ``fp16`` or ``bf16`` to a torch dtype."""
    if text not in DTYPES:
        raise UserError(f"--dtype {text!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[text]




def read_prompts_file(path: str | Path) -> tuple[str, ...]:
    """Prompts from a text file, one per line; blank lines are skipped.

    Raises:
        UserError: If the file is missing, unreadable or holds no prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {str(p)!r}: no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {str(p)!r}: cannot read it as UTF-8 text ({e})") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise UserError(f"--prompts {str(p)!r}: the file holds no prompt (one prompt per line)")
    return prompts


def text2image_pipeline_names() -> set[str]:
    """Class names of the pipelines diffusers' ``AutoPipelineForText2Image`` knows, minus ControlNet kin.

    ControlNet and control pipelines need a control image besides the prompt, so they are not
    text-to-image in the sense of this benchmark.
    """
    return {c.__name__ for c in text2image_pipeline_classes() if "Control" not in c.__name__}


def check_supported(class_name: str, components: Sequence[str]) -> str:
    """Refuse pipelines this backbone cannot run; return the denoiser's component name.

    Supported: text-to-image pipelines (see :func:`text2image_pipeline_names`) with a ``unet`` or
    ``transformer`` denoiser and at least one text encoder.

    Raises:
        UserError: Naming the pipeline class and what it lacks.
    """
    names = set(components)
    denoiser = "unet" if "unet" in names else "transformer" if "transformer" in names else None
    supported = "text-to-image pipelines with a unet or transformer denoiser and text prompts " \
                "(Stable Diffusion 1.x/2.x, SDXL, SD3, PixArt, Flux and kin)"
    if denoiser is None:
        raise UserError(f"{class_name} has no unet or transformer denoiser "
                        f"(components: {', '.join(sorted(names)) or 'none'}); supported: {supported}")
    if not any(_TEXT_ENCODER.match(n) for n in names):
        raise UserError(f"{class_name} has no text encoder; supported: {supported}")
    if class_name not in text2image_pipeline_names():
        raise UserError(f"{class_name} is not a text-to-image pipeline this backbone can run "
                        f"(it may need an input image or a control image); supported: {supported}")
    return denoiser


def _is_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


class PipelineBackbone(Backbone):
    """A diffusers text-to-image pipeline from a local folder (or a hub id when online).

    Args:
        arg: The ``PATH`` of ``diffusers:PATH``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``fp32``, ``fp16`` or ``bf16``: the dtype every component is loaded in.
        prompts_file: A text file of prompts, one per line (blank lines skipped); ``None`` for the
            built-in list.

    Raises:
        UserError: For a missing PATH or folder, a folder that holds no diffusers pipeline, an
            unsupported pipeline class, a bad device or dtype, or a missing or empty prompts file.
    """

    kind = "diffusers"

    def __init__(self, arg: str | None, *, device: str = "cpu", dtype: str = "fp32",
                 prompts_file: str | Path | None = None) -> None:
        if not arg:
            raise UserError("the diffusers backbone needs a pipeline: --backbone diffusers:PATH "
                            "(a folder written by save_pretrained, e.g. by `un0-bench make-tiny-pipeline DIR`)")
        self.source = arg
        self.name = f"diffusers:{arg}"
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        path = Path(arg).expanduser()
        self.local = path.exists()
        self.path: Path | None = path if self.local else None
        self.class_name: str | None = None
        self.components: list[str] = []
        self.denoiser: str | None = None
        if self.local:
            index = path / "model_index.json"
            if not path.is_dir() or not index.is_file():
                raise UserError(f"{arg}: not a diffusers pipeline folder (no model_index.json); "
                                "write one with DiffusionPipeline.save_pretrained or `un0-bench make-tiny-pipeline`")
            try:
                meta = json.loads(index.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"{index}: unreadable model index ({e})") from None
            self.class_name = str(meta.get("_class_name", "?"))
            # A component saved as [null, null] is absent (e.g. a removed safety checker).
            self.components = sorted(k for k, v in meta.items() if not k.startswith("_") and isinstance(v, list)
                                     and len(v) == 2 and v[1] is not None)
            self.denoiser = check_supported(self.class_name, self.components)
        elif not _is_hub_id(arg) or path.parent.is_dir():
            # "models/sd15" with a local "models/" folder is a mistyped path, not a hub id to download.
            raise UserError(f"{arg}: no such folder (and not a hub id of the form owner/name)")
        self.prompts_file = Path(prompts_file) if prompts_file is not None else None
        self._prompts = read_prompts_file(self.prompts_file) if self.prompts_file is not None else BUILTIN_PROMPTS
        self._tokenizer: Any = None
        if self.local:
            for i, p in enumerate(self._prompts):
                try:
                    self.check_prompt(p)
                except PromptError as e:
                    where = f"{self.prompts_file}, prompt {i + 1}" if self.prompts_file else "built-in prompt"
                    raise UserError(f"{where}: {e}") from None

    # -- prompts ---------------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        """The pipeline's first tokenizer (``tokenizer`` component), loaded once; ``None`` if it has none."""
        if self._tokenizer is None and (not self.local or "tokenizer" in self.components):
            self._tokenizer = transformers_class("AutoTokenizer").from_pretrained(self.source, subfolder="tokenizer",
                                                            local_files_only=self.local)
        return self._tokenizer

    def prompt_limit(self) -> int | None:
        """Most tokens a prompt may have (the tokenizer's length minus start and end), or ``None``."""
        tok = self.tokenizer()
        if tok is None or tok.model_max_length > _NO_LIMIT:
            return None
        return int(tok.model_max_length) - 2

    def accepted(self) -> str:
        limit = self.prompt_limit()
        return "any non-empty text" + (f" of at most {limit} tokens" if limit is not None else "")

    def check_prompt(self, prompt: str) -> None:
        """Refuse empty prompts and prompts the tokenizer would truncate (never silently cut)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"empty prompt {prompt!r}; accepted prompts: {self.accepted()}")
        limit = self.prompt_limit()
        if limit is not None:
            n = len(self.tokenizer()(prompt, add_special_tokens=False).input_ids)
            if n > limit:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise PromptError(f"prompt {short!r} is {n} tokens long, the text encoder would truncate it; "
                                  f"accepted prompts: {self.accepted()}")

    def default_prompts(self, n: int) -> list[str]:
        """``n`` prompts cycling over the ``--prompts`` file or the built-in list."""
        return [self._prompts[i % len(self._prompts)] for i in range(n)]

    # -- pipeline --------------------------------------------------------------------------------

    def load_pipeline(self, dtype: torch.dtype | None = None) -> Any:
        """A fresh pipeline on the backbone's device, in ``dtype`` (default: the backbone's ``--dtype``).

        Every generator gets its own copy, because techniques change the denoiser in place. The
        safety checker, if the folder has one, is not loaded: it is not part of generating an image.
        """
        kwargs: dict[str, Any] = {from_pretrained_dtype_key(): dtype or self.dtype}
        if self.local:
            kwargs["local_files_only"] = True
        if "safety_checker" in self.components:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, without the warning
        try:
            pipe = diffusers_class("DiffusionPipeline").from_pretrained(self.source, **kwargs)
        except (OSError, ValueError) as e:
            where = "folder" if self.local else "hub id (nothing is downloaded for a local folder)"
            raise UserError(f"cannot load the pipeline from {self.source} ({where}): {e}") from None
        self.class_name = type(pipe).__name__
        self.denoiser = check_supported(self.class_name, [k for k, v in pipe.components.items() if v is not None])
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def config_sha256(self) -> str | None:
        """Hash of the folder's model index and component configs (weights are not hashed: too large)."""
        if self.path is None:
            return None
        h = hashlib.sha256()
        files = [self.path / "model_index.json", *sorted(self.path.glob("*/*config*.json"))]
        for f in files:
            h.update(f.relative_to(self.path).as_posix().encode())
            h.update(f.read_bytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        prompts: dict[str, Any] = {"count": len(self._prompts)}
        if self.prompts_file is not None:
            prompts.update(source=str(self.prompts_file),
                           sha256=hashlib.sha256("\n".join(self._prompts).encode()).hexdigest())
        else:
            prompts["source"] = "built-in"
        return {
            "kind": self.kind,
            "source": self.source,
            "local": self.local,
            "pipeline": self.class_name,
            "denoiser": self.denoiser,
            "components": self.components,
            "device": self.device,
            "dtype": dtype_label(self.dtype),
            "prompts": prompts,
            "config_sha256": self.config_sha256(),
        }


    # -- the base model and its sampler ----------------------------------------------------------

    def check_base_weights(self) -> list[Path]:
        """Every component's weights files: safetensors headers opened (no tensors read), ``.bin`` files listed.

        Their hashes key resume; diffusers reads them at load time.
        """
        from un0_bench.harness.weights.checkpoints import check_header

        if self.path is None:
            return []  # a hub id: diffusers resolves its files at load time
        files: list[Path] = []
        for component in self.components:
            folder = self.path / component
            if not folder.is_dir():
                continue
            for f in sorted(folder.glob("*.safetensors")):
                check_header(f)
                files.append(f)
            files.extend(sorted(folder.glob("*.bin")))
        return files

    def weights_name(self, path: Path) -> str:
        return Path(path).relative_to(self.path).as_posix() if self.path is not None else Path(path).name

    def _denoiser_class(self) -> str | None:
        """Class name of the denoiser, from its config file (nothing loaded)."""
        if self.path is None or self.denoiser is None:
            return None
        try:
            return str(json.loads((self.path / self.denoiser / "config.json").read_text())["_class_name"])
        except (OSError, ValueError, KeyError):
            return None

    def _default_steps(self) -> int:
        try:
            defaults = call_defaults(diffusers_class(self.class_name)) if self.class_name else {}
        except KeyError:
            defaults = {}
        return int(defaults.get("num_inference_steps") or 50)

    def plan_base(self, steps: int | None) -> Plan:
        from un0_bench.harness.core.model import Plan

        return Plan("diffusers", self._denoiser_class() or "unknown", steps or self._default_steps(),
                    weights="pipeline")

    def base_model(self, steps: int | None) -> Model:
        from un0_bench.harness.core.model import Model

        pipe = self.load_pipeline()
        _, denoiser = denoiser_of(pipe)
        steps = steps or int(call_defaults(pipe).get("num_inference_steps") or 50)
        return Model(denoiser=denoiser, steps=steps, host=pipe)

    def sampler(self, model: Model) -> Generator:
        from un0_bench.backbones.pipeline_sampler import PipelineSampler

        return PipelineSampler(model, self)

    # -- quality: CLIP score of the measured images -----------------------------------------------

    def check_quality_options(self, options: QualityOptions) -> None:
        if options.seeds > 1:
            raise UserError("--quality-seeds applies to the digits backbone (FID draws); pipelines are scored by "
                            "CLIP on the measured images")
        if options.clip is not None:
            p = Path(options.clip).expanduser()
            if not p.is_dir():
                raise UserError(f"--clip {options.clip!r}: no such folder (a CLIP model saved with save_pretrained, "
                                "with its processor: nothing is downloaded)")
            if options.samples > 0:
                load_clip(p)  # pre-flight: a folder without a CLIP model is refused before the first cell

    def evaluate_quality(self, generator: Generator, measured: GenerationResult,
                         options: QualityOptions) -> dict[str, Any] | None:
        if options.samples == 0 or options.clip is None:
            return None
        return clip_quality(measured.images, measured.prompts, options.clip)

    def quality_missing_reason(self, options: QualityOptions) -> str:
        if options.samples == 0:
            return "--quality-samples 0"
        return "no --clip model given: energy is not quality-matched"

    def quality_band(self, q: dict[str, Any], ref: dict[str, Any], options: QualityOptions
                     ) -> tuple[bool, bool | None]:
        # NB: pipelines have no FID here; matched means a CLIP score at most accuracy_drop (relative)
        # below the reference's.
        return bool(q["clip_score"] >= (1 - options.accuracy_drop) * ref["clip_score"]), None


# --- helpers the techniques use (so they need not import diffusers themselves) --------------------










# --- quality: CLIP score with a local CLIP model -------------------------------------------------


def load_clip(path: str | Path) -> tuple[Any, Any]:
    """A ``CLIPModel`` and ``CLIPProcessor`` from a local folder, offline.

    Raises:
        UserError: If the folder is missing or does not hold a CLIP model and processor.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"--clip {str(path)!r}: no such folder (a CLIP model saved with save_pretrained, "
                        "with its processor: nothing is downloaded)")
    try:
        model = transformers_class("CLIPModel").from_pretrained(p, local_files_only=True).eval()
        processor = transformers_class("CLIPProcessor").from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--clip {str(path)!r}: cannot load a CLIP model and processor from it ({e})") from None
    return model, processor


def _features_tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _TensorFeatures(torch.nn.Module):
    """A CLIP model whose ``get_*_features`` return tensors, as torchmetrics expects.

    transformers 5 returns output objects from them (the projected embedding is ``pooler_output``);
    torchmetrics 1.9 divides the result by its norm directly.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features_tensor(self.model.get_text_features(*args, **kwargs))


def clip_quality(images: torch.Tensor, prompts: Sequence[str], clip_path: str | Path | None) -> dict[str, Any] | None:
    """CLIP score of images against their prompts with a local CLIP model, through torchmetrics.

    The score of one image is ``max(100 * cos(image embedding, text embedding), 0)`` (Hessel et al.,
    2021, as torchmetrics' ``CLIPScore``); the result is the mean over images with its spread.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        prompts: One prompt per image.
        clip_path: Local folder of a CLIP model (``--clip``), or ``None``.

    Returns:
        ``None`` when no CLIP model is given (quality not measured), else ``{"clip_score": mean,
        "clip_score_std": ..., "clip_score_per_image": [...], "images": N, "clip_model": path,
        "metric": ...}``.

    Raises:
        UserError: For a missing or unloadable CLIP folder, or images and prompts that do not pair up.
    """
    if clip_path is None:
        return None
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise UserError(f"clip_quality needs (N, 3, H, W) images and N prompts, got {tuple(images.shape)} "
                        f"and {len(prompts)} prompts")
    model, processor = load_clip(clip_path)
    from torchmetrics.multimodal.clip_score import CLIPScore

    # A callable keeps torchmetrics from resolving the name itself (it accepts only known hub ids).
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    scores = []
    # CLIP's image processor expects 0-255 pixels (it rescales by 1/255 itself).
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    for img, prompt in zip(pixels, prompts, strict=True):
        metric.reset()
        metric.update(img, prompt)
        scores.append(float(metric.compute()))
    t = torch.tensor(scores, dtype=torch.float64)
    return {
        "clip_score": float(t.mean()),
        "clip_score_std": float(t.std()) if len(scores) > 1 else 0.0,
        "clip_score_per_image": scores,
        "images": len(scores),
        "clip_model": str(clip_path),
        "metric": "torchmetrics CLIPScore (100 x cosine, clamped at 0), mean over images",
    }
