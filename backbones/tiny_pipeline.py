"""A tiny Stable Diffusion pipeline built entirely from configs, for smoke tests of ``diffusers:PATH``.

:func:`make_tiny_pipeline` writes a ``StableDiffusionPipeline`` with random weights (seeded) to a
folder with ``save_pretrained``: a two-level ``UNet2DConditionModel`` with cross-attention in its
shallow blocks (as Stable Diffusion has), an ``AutoencoderKL`` with a 2x latent downsampling, a
two-layer ``CLIPTextModel`` and a ``CLIPTokenizer`` whose vocabulary and merges are written here
(every byte as a token, plus a handful of merges, so any text tokenizes). Nothing is downloaded; the
folder loads through exactly the path a real checkpoint takes. Images are 32x32 and meaningless:
the pipeline measures the machinery, not the pictures.

:func:`make_tiny_clip` writes a tiny ``CLIPModel`` plus its processor, so the CLIP-score path can be
exercised offline the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from un0_bench.backbones.hf import diffusers_class, transformers_class
from un0_bench.harness.errors import UserError

#: Image side of the tiny pipeline in pixels (latents are 16x16: the VAE halves the side).
IMAGE_SIZE = 32
#: Hidden size of the tiny text encoder (the UNet's cross-attention width must match it).
TEXT_HIDDEN = 32
#: Schedulers :func:`make_tiny_pipeline` can write.
SCHEDULERS = ("ddim", "pndm")

#: A few BPE merges so that common words are not all single characters (the CLIP format).
_MERGES = ("t h", "th e</w>", "a n", "o n", "e r</w>", "i n", "a t</w>", "o r</w>")
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2 and CLIP byte-level BPE, in byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    order = sorted(range(256), key=lambda i: bs[i])
    return [chr(cs[i]) for i in order]


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the tiny CLIP tokenizer: each byte alone and word-final, merges, specials."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [tuple(m.split()) for m in _MERGES]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    return vocab, merges  # type: ignore[return-value]


def _tokenizer() -> Any:
    CLIPTokenizer = transformers_class("CLIPTokenizer")

    vocab, merges = tiny_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77  # as every CLIP text encoder: 75 tokens plus start and end
    return tok


def _text_config(vocab_size: int, **extra: Any) -> dict[str, Any]:
    vocab, _ = tiny_vocab()
    return dict(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab[_BOS],
                eos_token_id=vocab[_EOS], pad_token_id=vocab[_EOS], **extra)


def _prepare(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_tiny_pipeline(out: str | Path, scheduler: str = "ddim", seed: int = 0) -> Path:
    """Write a tiny, randomly initialised ``StableDiffusionPipeline`` to ``out``.

    Args:
        out: A new or empty folder.
        scheduler: ``"ddim"`` (default) or ``"pndm"`` (Stable Diffusion 1.x's own).
        seed: Seed of the random weights.

    Returns:
        The folder, loadable with ``DiffusionPipeline.from_pretrained(out, local_files_only=True)``
        and usable as ``--backbone diffusers:OUT``.

    Raises:
        UserError: If ``out`` exists and is not an empty folder, or ``scheduler`` is unknown.
    """
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    import torch
    AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel = map(
        diffusers_class,
        ("AutoencoderKL", "DDIMScheduler", "PNDMScheduler", "StableDiffusionPipeline", "UNet2DConditionModel"))
    CLIPTextConfig, CLIPTextModel = map(transformers_class, ("CLIPTextConfig", "CLIPTextModel"))

    out = _prepare(out)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    # Two resolutions (16x16 and 8x8 latents) with cross-attention in the shallow blocks and the
    # middle block, like Stable Diffusion's layout in miniature: DeepCache has a deep branch to skip
    # and un0 has feed-forward layers to gate.
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(len(tokenizer))))
    # Stable Diffusion 1.x's noise schedule.
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    sched = (DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common) if scheduler == "ddim"
             else PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    (out / "README.md").write_text(
        "A tiny Stable Diffusion pipeline with random weights, written by "
        f"`un0-bench make-tiny-pipeline` (seed {seed}, scheduler {scheduler}).\n"
        f"Images are {IMAGE_SIZE}x{IMAGE_SIZE} and meaningless: it is for smoke tests of "
        "`--backbone diffusers:PATH`.\n"
    )
    return out


def make_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised ``CLIPModel`` and ``CLIPProcessor`` to ``out`` (for ``--clip``).

    Raises:
        UserError: If ``out`` exists and is not an empty folder.
    """
    import torch
    CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor = map(
        transformers_class, ("CLIPConfig", "CLIPImageProcessor", "CLIPModel", "CLIPProcessor"))

    out = _prepare(out)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=_text_config(len(tokenizer)),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=TEXT_HIDDEN, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=TEXT_HIDDEN,
    )
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / "un0-tiny-clip.json").write_text(json.dumps({"seed": seed, "note": "random weights, for smoke tests"}))
    return out
