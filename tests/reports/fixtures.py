"""Synthetic result records: reports are tested without running any model."""

from __future__ import annotations

import copy
from typing import Any

from un0_bench.harness.running.record import SCHEMA_VERSION, Record
from un0_bench.harness.running.results import ResultStore

ENV = {"cpu": "Test CPU", "versions": {"torch": "2.13.0"}}
#: What codecarbon recorded on a host without RAPL or NVML (before it recorded its class of evidence).
#: ``derivation_energy`` of a model for which nothing was trained (``None`` would say: not recorded, unknown).
NOTHING_TRAINED: dict[str, Any] = {}
CODECARBON_TDP = {"estimate": True, "methods": {"cpu": "TDP x load", "ram": "size model"}, "tdp_w": 8.0}


def record(model: str, meter: str, energy: float | None, *, flops: float = 1e9, fid: float | None = 5.0,
           accuracy: float = 0.97, matched: bool | None = True, parts: dict[str, float] | None = None,
           derivation: dict[str, Any] | None = NOTHING_TRAINED, status: str = "ok", **extra: Any) -> Record:
    r = {
        "model": model, "backbone": "digits", "batch_size": 8, "meter": meter, "status": status, "images": 8,
        "energy_j_per_image": energy, "energy_ci95_j": None if energy is None else [energy * 0.9, energy * 1.1],
        "flops_per_image": flops, "bytes_per_image": flops / 10, "duration_s_per_image": 0.01,
        "uncounted_ops": {}, "config": {"generator": {"technique": "test", "parameters": 1000}, "run": {}},
        "environment": ENV, "quality": None if fid is None else {"fid": fid, "kid": 0.01, "kid_std": 0.001,
                                                                 "accuracy": accuracy, "samples": 100},
        "quality_matched": matched, "flops_per_image_by_dtype": {"float32": flops},
        "derivation_energy": copy.deepcopy(derivation),
        "gating_flops_per_image": 0.0, "gating_bytes_per_image": 0.0,
    }
    if parts is not None:
        r["proxy_j_per_image_by_part"] = parts
    r.update(extra)
    return Record.from_json({"schema": SCHEMA_VERSION, **r})


def proxy(model: str, compute: float, gating: float = 0.0, memory: float = 0.0, **kw: Any) -> Record:
    parts = {"compute": compute, "gating": gating, "memory": memory, "gating_memory": 0.0}
    return record(model, "proxy", compute + gating + memory, parts=parts, **kw)


def write(out_dir, records) -> None:
    ResultStore(out_dir).append(records)
