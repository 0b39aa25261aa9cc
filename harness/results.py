"""Result records and the append-only ``results.jsonl`` store (resume, nothing lost on interrupt).

One record per cell: model x backbone x batch size x meter. A record is appended, flushed and
fsynced as soon as its cell is measured; re-running into the same folder skips finished cells.
Result files are the only interface between measuring and reporting.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from un0_bench.harness.errors import UserError

#: 2: records name their stack (`stack`, `model_canonical`) and no longer store a ledger (reports compute
#: it from the run's settings); files of version 1 are read the same way.
SCHEMA_VERSION = 2
RESULTS_FILE = "results.jsonl"

#: Schema versions this code reads (a record without ``schema`` is of version 1).
READABLE_SCHEMAS = (1, 2)
LOCK_FILE = ".lock"

#: Fields every record has (later issues add fields; these names stay).
REQUIRED_FIELDS = (
    "model", "backbone", "batch_size", "meter", "status", "images", "energy_j_per_image",
    "energy_ci95_j", "flops_per_image", "bytes_per_image", "duration_s_per_image", "uncounted_ops",
    "config", "environment",
)

_TEXT_FIELDS = ("model", "backbone", "meter", "status")
_COUNT_FIELDS = ("batch_size", "images")
_NUMBER_FIELDS = ("energy_j_per_image", "flops_per_image", "bytes_per_image", "duration_s_per_image")
_OBJECT_FIELDS = ("uncounted_ops", "config", "environment")


class SchemaVersionError(UserError):
    """A results file written by a newer un0-bench (a schema version this code cannot read)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def record_problem(record: Any) -> str | None:
    """The one schema check: why ``record`` is not a valid result record, or ``None`` if it is.

    A schema version this code cannot read raises :class:`SchemaVersionError` instead (not a bad
    line: a file from a newer un0-bench, to be refused as a whole).
    """
    if not isinstance(record, dict):
        return f"not a record (a JSON {type(record).__name__}, expected an object)"
    version = record.get("schema", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_SCHEMAS:
        raise SchemaVersionError(f"schema version {version!r}; this un0-bench reads versions "
                                 f"{', '.join(map(str, READABLE_SCHEMAS))}")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        return f"lacks required fields {missing}"
    for k in _TEXT_FIELDS:
        if not isinstance(record[k], str) or not record[k]:
            return f"{k} must be a non-empty string, got {record[k]!r}"
    for k in _COUNT_FIELDS:
        v = record[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            return f"{k} must be a positive integer, got {v!r}"
    for k in _NUMBER_FIELDS:
        if record[k] is not None and not _is_number(record[k]):
            return f"{k} must be a finite number or null, got {record[k]!r}"
    ci = record["energy_ci95_j"]
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(_is_number(v) for v in ci)):
        return f"energy_ci95_j must be [low, high] or null, got {ci!r}"
    for k in _OBJECT_FIELDS:
        if record[k] is not None and not isinstance(record[k], dict):
            return f"{k} must be an object or null, got {type(record[k]).__name__}"
    return None


def cell_key(record: dict[str, Any]) -> tuple[str, str, int, str]:
    return (record["model"], record["backbone"], int(record["batch_size"]), record["meter"])


def _warn(message: str) -> None:
    print(f"un0-bench: warning: {message}", file=sys.stderr)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


class ResultStore:
    """``DIR/results.jsonl``: read what is finished, append new records durably, one writer at a time.

    Every line that cannot be read or is not a valid record is reported (``warn``: file, line, why)
    and skipped; the reports of the last :meth:`load` are kept in :attr:`problems`.
    """

    def __init__(self, out_dir: Path, warn: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self.lock_path = self.out_dir / LOCK_FILE
        self.warn = warn or _warn
        self.problems: list[str] = []
        self._reported: set[str] = set()

    def _report(self, message: str) -> None:
        self.problems.append(message)
        if message not in self._reported:  # the same store loads more than once (resume, then the summary)
            self._reported.add(message)
            self.warn(message)

    def load(self) -> list[dict[str, Any]]:
        """All valid records; every other line is reported and skipped (a torn last line too)."""
        self.problems = []
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {self.path}: {e.strerror or e}") from None
        lines = data.split(b"\n")
        torn = lines[-1] != b""  # the file does not end on a line boundary
        records = []
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            where = f"{self.path} line {number}"
            try:
                record = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
            except UnicodeDecodeError as e:
                self._report(f"{where}: skipped: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            except (ValueError, RecursionError) as e:
                if torn and number == len(lines):
                    self._report(f"{where}: skipped: torn last line (no newline at its end: an interrupted write)")
                else:
                    self._report(f"{where}: skipped: not JSON ({e})")
                continue
            try:
                why = record_problem(record)
            except SchemaVersionError as e:
                raise SchemaVersionError(f"{where}: {e}: written by a newer un0-bench; use that version, or "
                                         f"another output folder") from None
            if why is not None:
                self._report(f"{where}: skipped: {why}")
                continue
            records.append(record)
        return records

    def done(self) -> set[tuple[str, str, int, str]]:
        return {cell_key(r) for r in self.load()}

    def _end_torn_tail(self) -> None:
        """Start the next append on a line boundary: cut a torn last line, or end a complete one."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            start = data.rfind(b"\n") + 1
            number = data.count(b"\n") + 1
            tail = data[start:]
            try:
                complete = record_problem(json.loads(tail.decode("utf-8"), parse_constant=_reject_constant)) is None
            except (ValueError, RecursionError, SchemaVersionError):
                complete = False
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                self._report(f"{self.path} line {number}: had no newline at its end; ended it")
            else:
                f.truncate(start)
                self._report(f"{self.path} line {number}: cut a torn last line ({len(tail)} bytes, an interrupted "
                             f"write)")
            f.flush()
            os.fsync(f.fileno())

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for record in records:
            why = record_problem({"schema": SCHEMA_VERSION, **record})
            if why is not None:
                raise ValueError(f"invalid record: {why}")
            lines.append(json.dumps({"schema": SCHEMA_VERSION, **record}, sort_keys=True, default=_jsonable,
                                    allow_nan=False) + "\n")
        self._end_torn_tail()
        with self.path.open("a") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def refuse_if_locked(self) -> None:
        """Pre-flight: refuse now if a live process holds the folder (:meth:`lock` checks again)."""
        holder = _lock_holder(self.lock_path) if self.lock_path.exists() else None
        if holder is not None and holder != os.getpid() and _alive(holder):
            raise UserError(self._held_by(holder))

    def _held_by(self, holder: int) -> str:
        return (f"{self.out_dir} is being written by another run (process {holder}, lock {self.lock_path}); wait "
                f"for it to finish or choose another --out")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``DIR/.lock`` (this process's id) while writing; refuse if a live process holds it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.lock_path)
                if holder is not None and holder != os.getpid() and _alive(holder):
                    raise UserError(self._held_by(holder)) from None
                who = ("an unreadable lock" if holder is None else "left by this process" if holder == os.getpid()
                       else f"process {holder}, no longer running")
                self._report(f"{self.lock_path}: took over a stale lock ({who})")
                try:
                    self.lock_path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            break
        else:
            raise UserError(f"cannot take the lock {self.lock_path}: another run keeps taking it")
        try:
            yield
        finally:
            if _lock_holder(self.lock_path) == os.getpid():
                self.lock_path.unlink()


def _lock_holder(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OSError:
        return False
    return True


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be made in ``folder`` (which need not exist yet), or ``None``; creates nothing."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is not a folder"
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    if probe == folder:
        try:
            test = folder / f".write-test-{os.getpid()}"
            test.write_text("ok")
            test.unlink()
        except OSError as e:
            return str(e.strerror or e)
    return None


def check_writable(out_dir: Path, what: str = "output folder") -> None:
    """Fail before any work starts if ``out_dir`` cannot hold results.

    Creates nothing: a refused run leaves no empty folders behind (the folder is made with its first file).
    """
    out_dir = Path(out_dir)
    if str(out_dir).strip() == "":
        raise UserError(f"the {what} is an empty path; name a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{what} {out_dir} exists and is not a folder")
    why = _unwritable(out_dir)
    if why is not None:
        raise UserError(f"cannot write to {what} {out_dir}: {why}")


def check_file_writable(path: Path, what: str = "output file") -> None:
    """Fail before any work starts if the file ``path`` cannot be written; creates nothing."""
    path = Path(path)
    if str(path).strip() == "":
        raise UserError(f"the {what} is an empty path; name a file")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; name a file")
    why = _unwritable(path.parent)
    if why is not None:
        raise UserError(f"cannot write {what} {path}: {why}")
