"""The append-only JSONL stores of an output folder: ``results.jsonl`` and ``quality.jsonl``.

One :class:`JsonlStore` serves both: append (flushed and fsynced, starting on a line boundary after an
interrupted write), load (every line that is not a valid entry is refused with its line number and
skipped) and resume. :class:`ResultStore` holds the :class:`~un0_bench.harness.running.record.Record` s of a
folder, and its lock (one writer at a time); :class:`QualityStore` the quality figure of each model.
Re-running into the same folder skips finished cells. Result files are the only interface between
measuring and reporting.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.record import READABLE_SCHEMAS, SCHEMA_VERSION, Record, RecordError, SchemaVersionError

__all__ = ["READABLE_SCHEMAS", "SCHEMA_VERSION", "CellKey", "JsonlStore", "QualityEntry", "QualityStore", "Record",
           "ResultStore", "SchemaVersionError", "check_file_writable", "check_writable"]

RESULTS_FILE = "results.jsonl"
QUALITY_FILE = "quality.jsonl"
LOCK_FILE = ".lock"

#: A cell of a folder, as resume knows it: (canonical model, backbone, batch size, meter).
CellKey = tuple[str, str, int, str]

T = TypeVar("T")


def _warn(message: str) -> None:
    print(f"un0-bench: warning: {message}", file=sys.stderr)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


class JsonlStore(Generic[T]):
    """``DIR/NAME``: one JSON object a line, each an entry ``parse`` reads (and ``dump`` writes).

    ``parse`` raises :class:`RecordError` (field and problem) for a line that is not an entry; such a
    line is reported (``warn``: ``file:line: field: problem``) and skipped. The reports of the last
    :meth:`load` are kept in :attr:`problems`.
    """

    def __init__(self, path: Path, parse: Callable[[Any], T], dump: Callable[[T], dict[str, Any]],
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.parse, self.dump = parse, dump
        self.warn = warn or _warn
        self.problems: list[str] = []
        self._reported: set[str] = set()

    def _report(self, message: str) -> None:
        self.problems.append(message)
        if message not in self._reported:  # the same store loads more than once (resume, then the summary)
            self._reported.add(message)
            self.warn(message)

    def _read(self, raw: bytes, where: str) -> T:
        """The entry of one line (``where``: ``file:line``), or :class:`RecordError`."""
        try:
            value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as e:
            raise RecordError(None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (ValueError, RecursionError) as e:
            raise RecordError(None, f"not JSON ({e})") from None
        try:
            return self.parse(value)
        except SchemaVersionError as e:
            raise SchemaVersionError(f"{where}: {e}: written by a newer un0-bench; use that version, or another "
                                     f"output folder") from None

    def load(self) -> list[T]:
        """Every valid entry; every other line is refused with its number and skipped (a torn last line too)."""
        self.problems = []
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {self.path}: {e.strerror or e}") from None
        lines = data.split(b"\n")
        torn = lines[-1] != b""  # the file does not end on a line boundary
        out = []
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                out.append(self._read(raw, where))
            except RecordError as e:
                if torn and number == len(lines) and e.field is None and e.problem.startswith("not JSON"):
                    self._report(f"{where}: torn last line (no newline at its end: an interrupted write); skipped")
                else:
                    self._report(f"{where}: {e}; skipped")
        return out

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
                self._read(tail, f"{self.path}:{number}")
                complete = True
            except (RecordError, SchemaVersionError):
                complete = False
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                self._report(f"{self.path}:{number}: had no newline at its end; ended it")
            else:
                f.truncate(start)
                self._report(f"{self.path}:{number}: cut a torn last line ({len(tail)} bytes, an interrupted write)")
            f.flush()
            os.fsync(f.fileno())

    def append(self, entries: Iterable[T]) -> None:
        """Append ``entries`` durably (all or none: each is written as strict JSON first)."""
        lines = [json.dumps(self.dump(e), sort_keys=True, default=_jsonable, allow_nan=False) + "\n" for e in entries]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._end_torn_tail()
        with self.path.open("a") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())


def _record(value: Any) -> Record:
    return value if isinstance(value, Record) else Record.from_json({"schema": SCHEMA_VERSION, **value})


class ResultStore(JsonlStore[Record]):
    """``DIR/results.jsonl``: the folder's :class:`Record` s; read what is finished, append new ones, one writer.

    :meth:`load` gives every valid record (each bad line refused with its number).
    """

    def __init__(self, out_dir: Path, warn: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.lock_path = self.out_dir / LOCK_FILE
        super().__init__(self.out_dir / RESULTS_FILE, Record.from_json, Record.to_json, warn)

    def append(self, records: Iterable[Record | dict[str, Any]]) -> None:
        """Append records (a dict is read as a record first: a bad one is refused before anything is written)."""
        try:
            checked = [_record(r) for r in records]
        except RecordError as e:
            raise ValueError(f"invalid record: {e}") from None
        super().append(checked)

    def finished(self, canonical: Callable[[Record], str]) -> set[CellKey]:
        """The cells resume skips: measured under any name of their model (``canonical``), failed ones excluded."""
        return {(canonical(r), r.backbone, r.batch_size, r.meter) for r in self.load() if not r.failed}

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


@dataclass(frozen=True)
class QualityEntry:
    """One model's quality figure in ``quality.jsonl``, with the settings it was judged under."""

    model: str
    backbone: str
    samples_requested: int
    seeds_requested: int
    quality: dict[str, Any]

    @classmethod
    def from_json(cls, value: Any) -> QualityEntry:
        if not isinstance(value, dict):
            raise RecordError(None, f"not a quality entry (a JSON {type(value).__name__}, expected an object)")
        for name, ok, what in (("model", str, "a string"), ("backbone", str, "a string"),
                               ("samples_requested", int, "an integer"), ("quality", dict, "an object")):
            if name not in value:
                raise RecordError(name, "missing")
            if not isinstance(value[name], ok) or isinstance(value[name], bool):
                raise RecordError(name, f"must be {what}, got {value[name]!r}")
        seeds = value.get("seeds_requested", 1)  # entries before quality seeds were one draw
        if not isinstance(seeds, int) or isinstance(seeds, bool):
            raise RecordError("seeds_requested", f"must be an integer, got {seeds!r}")
        return cls(value["model"], value["backbone"], value["samples_requested"], seeds, value["quality"])


class QualityStore(JsonlStore[QualityEntry]):
    """``DIR/quality.jsonl``: each model's quality, judged once per folder and its quality settings."""

    def __init__(self, out_dir: Path, warn: Callable[[str], None] | None = None) -> None:
        super().__init__(Path(out_dir) / QUALITY_FILE, QualityEntry.from_json, asdict, warn)

    def figures(self, backbone: str, samples: int, seeds: int) -> dict[str, dict[str, Any]]:
        """Model -> its quality figure judged on ``backbone`` with these settings (the newest wins)."""
        return {q.model: q.quality for q in self.load()
                if (q.backbone, q.samples_requested, q.seeds_requested) == (backbone, samples, seeds)}


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
