"""Result records and the append-only ``results.jsonl`` store (resume, nothing lost on interrupt).

One record per cell: model x backbone x batch size x meter. A record is appended, flushed and
fsynced as soon as its cell is measured; re-running into the same folder skips finished cells.
Result files are the only interface between measuring and reporting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: 2: records name their stack (`stack`, `model_canonical`) and no longer store a ledger (reports compute
#: it from the run's settings); files of version 1 are read the same way.
SCHEMA_VERSION = 2
RESULTS_FILE = "results.jsonl"

#: Fields every record has (later issues add fields; these names stay).
REQUIRED_FIELDS = (
    "model", "backbone", "batch_size", "meter", "status", "images", "energy_j_per_image",
    "energy_ci95_j", "flops_per_image", "bytes_per_image", "duration_s_per_image", "uncounted_ops",
    "config", "environment",
)


def cell_key(record: dict[str, Any]) -> tuple[str, str, int, str]:
    return (record["model"], record["backbone"], int(record["batch_size"]), record["meter"])


class ResultStore:
    """``DIR/results.jsonl``: read what is finished, append new records durably."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE

    def load(self) -> list[dict[str, Any]]:
        """All complete records. A torn last line (a crash mid-write) is ignored, not fatal."""
        if not self.path.exists():
            return []
        records = []
        with self.path.open() as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def done(self) -> set[tuple[str, str, int, str]]:
        return {cell_key(r) for r in self.load()}

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for record in records:
                missing = [k for k in REQUIRED_FIELDS if k not in record]
                if missing:
                    raise ValueError(f"record lacks required fields {missing}")
                f.write(json.dumps({"schema": SCHEMA_VERSION, **record}, sort_keys=True, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def check_writable(out_dir: Path) -> None:
    """Fail before any work starts if ``out_dir`` cannot hold results."""
    from un0_bench.harness.errors import UserError

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None
