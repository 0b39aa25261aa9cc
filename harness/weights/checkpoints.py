"""Weights files: safetensors plus a metadata JSON beside them. Never unpickles anything."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.errors import CheckpointError

# A safetensors file starts with an 8-byte little-endian header length, then a JSON header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def metadata_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_checkpoint(weights: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write ``weights`` (safetensors) and ``weights.json`` (metadata) atomically."""
    from safetensors.torch import save_file

    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)
    meta_tmp = metadata_path(weights).with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    os.replace(meta_tmp, metadata_path(weights))


def check_header(weights: Path) -> None:
    """The safetensors header: an object of tensors (dtype, shape, data_offsets) within the file."""
    size = weights.stat().st_size
    with weights.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{weights}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{weights}: not a safetensors file, or truncated (header claims {n} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{weights}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{weights}: not a safetensors file (header is a JSON {type(header).__name__}, "
                              f"expected an object of tensors)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{weights}: bad safetensors header (__metadata__ must be an object of strings)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise CheckpointError(f"{weights}: holds no tensors (empty safetensors header)")
    end = 0
    for key, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{weights}: bad safetensors header (tensor {key!r}: expected data_offsets "
                                  f"[start, end] with 0 <= start <= end, got "
                                  f"{offsets if isinstance(entry, dict) else entry!r})")
        if not isinstance(entry.get("shape"), list) or not isinstance(entry.get("dtype"), str):
            raise CheckpointError(f"{weights}: bad safetensors header (tensor {key!r}: expected a dtype and a shape)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(f"{weights}: truncated (tensors need {8 + n + end} bytes, file has {size})")


def unpacked(unpack: Callable[..., dict[str, torch.Tensor]], state: dict[str, torch.Tensor], weights: Path,
             *args: Any) -> dict[str, torch.Tensor]:
    """``unpack(state, *args)`` of a packed file, refusing a file it cannot unpack (another model's) in one line."""
    try:
        return unpack(state, *args)
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{weights}: not the weights of this model (cannot unpack them: "
                              f"{type(e).__name__}: {e})") from None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    """``module.load_state_dict(state)``, refusing the weights of another model in one clear line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(own)} tensors missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors it does not have (first: {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of other shapes (first: {k} is {tuple(state[k].shape)}, expected "
                         f"{tuple(own[k].shape)})")
        raise CheckpointError(f"{weights}: not the weights of this model ({type(module).__name__}): "
                              f"{'; '.join(parts)}")
    module.load_state_dict(state)


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (a weights file's identity in records and resume keys).

    Remembered per (path, size, modification time) within a process, so a pipeline's gigabytes are
    read once per run, not once per model.
    """
    import hashlib

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key in _SHA256:
        return _SHA256[key]
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def check_checkpoint(weights: Path, expected_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Open ``weights`` without reading its tensors: its header, its metadata and their config.

    The pre-flight half of :func:`load_checkpoint`: a run checks every file it will load with this
    before the first cell is measured. Returns the metadata.

    Args:
        weights: Path to a ``.safetensors`` file with a ``.json`` metadata file beside it.
        expected_config: If given, must equal ``metadata["config"]``; otherwise the file was made
            for a different model and is refused, naming both configs' differences.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such weights file (run `un0-bench train` to make it)")
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights}: expected a .safetensors file (pickled checkpoints are refused)")
    check_header(weights)
    meta_file = metadata_path(weights)
    if not meta_file.is_file():
        raise CheckpointError(f"{weights}: metadata file {meta_file.name} is missing")
    try:
        metadata = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{meta_file}: metadata is a JSON {type(metadata).__name__}, expected an object")
    if expected_config is not None:
        found = metadata.get("config")
        if not isinstance(found, dict):
            raise CheckpointError(f"{meta_file}: metadata has no config object (expected the model's config)")
        if found != expected_config:
            diff = sorted(k for k in set(expected_config) | set(found) if found.get(k) != expected_config.get(k))
            shown = ", ".join(
                f"{k}: model has {expected_config.get(k)!r}, file has {found.get(k)!r}" for k in diff[:5]
            )
            raise CheckpointError(f"{weights}: checkpoint config does not match the model ({shown})")
    return metadata


def load_checkpoint(
    weights: Path, expected_config: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(state_dict, metadata)``, refusing missing, truncated, foreign or mismatched files.

    Checks the file as :func:`check_checkpoint` does (same arguments), then reads its tensors.
    """
    from safetensors.torch import load_file

    weights = Path(weights)
    metadata = check_checkpoint(weights, expected_config)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: cannot read safetensors data ({e})") from None
    return state, metadata
