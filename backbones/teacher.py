"""The digits teacher: a class-conditional diffusers ``UNet2DModel`` (~1M parameters) with DDIM.

Every digits baseline and both Un-0 generators are derived from this network. ``un0-bench train
teacher`` (``training/teacher.py``) reproduces the shipped weights from a seed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from un0_bench.backbones.digits_data import IMAGE_SIZE, WEIGHTS_DIR
from un0_bench.backbones.hf import diffusers_class
from un0_bench.harness.weights.checkpoints import load_checkpoint, load_into

#: UNet2DModel config. Three resolutions (16, 8, 4), attention at 8x8, 10 class embeddings.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": 10,
}

TEACHER_FILE = WEIGHTS_DIR / "teacher.safetensors"


def build_unet() -> torch.nn.Module:
    return diffusers_class("UNet2DModel")(**copy.deepcopy(UNET_CONFIG))


def load_teacher(path: Path = TEACHER_FILE) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained teacher in eval mode, with its metadata. Refuses a file made for another config."""
    state, meta = load_checkpoint(path, expected_config=UNET_CONFIG)
    unet = build_unet()
    load_into(unet, state, path)
    return unet.eval().requires_grad_(False), meta
