import json
import os
import random
import subprocess
import sys

import pytest
from un0_bench.harness.errors import UserError
from un0_bench.harness.running.record import SCHEMA_VERSION, Record, RecordError, SchemaVersionError
from un0_bench.harness.running.results import QualityStore, ResultStore, check_writable


def record(model, meter="wall"):
    r = {k: None for k in Record.core_fields()}
    r.update(model=model, backbone="digits", batch_size=4, meter=meter, status="ok", images=4)
    return r


def store(tmp_path):
    """A store whose warnings are collected (``store.warned``) instead of printed."""
    warned = []
    s = ResultStore(tmp_path, warn=warned.append)
    s.warned = warned
    return s


def test_append_load_and_done(tmp_path):
    store = ResultStore(tmp_path)
    store.append([record("sd"), record("sd", "proxy")])
    store.append([record("sd:steps=10")])
    assert [r["model"] for r in store.load()] == ["sd", "sd", "sd:steps=10"]
    assert store.finished(lambda r: r.model) == {("sd", "digits", 4, "wall"), ("sd", "digits", 4, "proxy"),
                                                 ("sd:steps=10", "digits", 4, "wall")}


def test_torn_last_line_is_ignored_with_a_warning(tmp_path):
    s = store(tmp_path)
    s.append([record("sd")])
    with s.path.open("a") as f:
        f.write('{"model": "half')
    assert len(s.load()) == 1
    assert s.problems == [f"{s.path}:2: torn last line (no newline at its end: an interrupted write); skipped"]
    assert s.warned == s.problems


def test_append_after_a_torn_tail_starts_on_a_line_boundary(tmp_path):
    # kill -9 mid-write leaves a fragment without newline; the next record must not be glued onto it.
    s = store(tmp_path)
    s.append([record("sd")])
    with s.path.open("a") as f:
        f.write('{"model": "half", "backb')
    s.append([record("sd:steps=10")])
    assert [r["model"] for r in s.load()] == ["sd", "sd:steps=10"]
    assert s.problems == []
    assert s.warned == [f"{s.path}:2: cut a torn last line (24 bytes, an interrupted write)"]
    assert s.path.read_text().count("\n") == 2


def test_a_complete_last_record_without_newline_is_ended_not_cut(tmp_path):
    s = store(tmp_path)
    s.path.write_text(json.dumps({"schema": 2, **record("sd")}))
    s.append([record("sd2")])
    assert [r["model"] for r in s.load()] == ["sd", "sd2"]
    assert s.warned == [f"{s.path}:1: had no newline at its end; ended it"]


@pytest.mark.parametrize("line, why", [
    (b'{"model":"x"}', "backbone: missing (a record lacks backbone, batch_size, meter, status, images, "
                       "energy_j_per_image, energy_ci95_j, flops_per_image, bytes_per_image, duration_s_per_image, "
                       "uncounted_ops, config, environment)"),
    (json.dumps({**record("bad"), "batch_size": "4"}).encode(), "batch_size: must be a positive integer, got '4'"),
    (b"[1,2,3]", "not a record (a JSON list, expected an object)"),
    (b"garbage", "not JSON (Expecting value: line 1 column 1 (char 0))"),
    (b'{"a": \xff}', "not UTF-8 text (invalid start byte at byte 6)"),
    (None, "energy_j_per_image: must be a finite number or null, got 'a lot'"),
    (b'{"energy_j_per_image": NaN}', "not JSON (NaN is not strict JSON)"),
])
def test_every_bad_line_is_reported_with_its_number_and_skipped(tmp_path, line, why):
    s = store(tmp_path)
    s.append([record("sd")])
    if line is None:
        line = json.dumps({**record("bad"), "energy_j_per_image": "a lot"}).encode()
    with s.path.open("ab") as f:
        f.write(line + b"\n")
    s.append([record("sd2")])
    assert [r["model"] for r in s.load()] == ["sd", "sd2"]
    assert s.problems == [f"{s.path}:2: {why}; skipped"]
    assert ("sd2", "digits", 4, "wall") in s.finished(lambda r: r.model)


def test_version_1_records_are_read_and_an_unknown_version_is_refused(tmp_path):
    s = store(tmp_path)
    s.path.write_text(json.dumps({"schema": 1, **record("old")}) + "\n" + json.dumps(record("older")) + "\n")
    assert [r["model"] for r in s.load()] == ["old", "older"]
    with s.path.open("a") as f:
        f.write(json.dumps({**record("new"), "schema": 3}) + "\n")
    with pytest.raises(SchemaVersionError) as e:
        s.load()
    assert str(e.value) == (f"{s.path}:3: schema version 3; this un0-bench reads versions 1, 2: written by a "
                            f"newer un0-bench; use that version, or another output folder")
    assert isinstance(e.value, UserError)  # the CLI's one line and exit 2


def _problem(value):
    try:
        Record.from_json(value)
    except RecordError as e:
        return str(e)
    return None


def test_the_one_schema_check():
    assert _problem({"schema": SCHEMA_VERSION, **record("sd")}) is None
    assert _problem({**record("sd"), "batch_size": True}) == "batch_size: must be a positive integer, got True"
    assert _problem({**record("sd"), "batch_size": 0}) == "batch_size: must be a positive integer, got 0"
    assert _problem({**record("sd"), "model": 3}) == "model: must be a non-empty string, got 3"
    assert _problem({**record("sd"), "energy_ci95_j": [1]}) == "energy_ci95_j: must be [low, high] or null, got [1]"
    assert _problem({**record("sd"), "config": []}) == "config: must be an object or null, got list"
    # Fields beyond the core are typed where they are known, and kept as written.
    assert _problem({**record("sd"), "quality_matched": "yes"}) == ("quality_matched: must be true/false or null, "
                                                                    "got str")
    assert _problem({**record("sd"), "repeats": 0}) == "repeats: must be a positive integer, got 0"
    with pytest.raises(SchemaVersionError, match="schema version 'two'"):
        Record.from_json({**record("sd"), "schema": "two"})


def test_a_record_reads_back_as_written_and_its_fields_are_typed():
    written = {"schema": 2, **record("sd"), "energy_j_per_image": 1.5, "energy_ci95_j": [1.0, 2.0],
               "quality": {"fid": 3.0}, "quality_matched": True, "window_s": [0.1, 0.2]}
    r = Record.from_json(written)
    assert (r.model, r.batch_size, r.energy_j_per_image, r.energy_ci95_j) == ("sd", 4, 1.5, (1.0, 2.0))
    assert r.get("quality_matched") is True and r.get("absent", "none") == "none"
    assert r.to_json() == written
    old = Record.from_json(record("v1"))  # version 1 wrote no schema, and reads back without one
    assert old.schema is None and "schema" not in old.to_json()



def test_a_record_is_read_by_its_stored_names_and_never_changed():
    written = {"schema": 2, **record("sd"), "energy_j_per_image": 1.5, "energy_ci95_j": [1.0, 2.0],
               "quality": {"fid": 3.0}}
    r = Record.from_json(written)
    # Reports read records by the names results.jsonl stores, core or extra, in the stored form:
    # 14 core fields + quality + schema = 16.
    assert dict(r) == written and list(r) == [*Record.core_fields(), "quality", "schema"] and len(r) == 16
    assert r["energy_ci95_j"] == [1.0, 2.0] and r["quality"] == {"fid": 3.0} and "ledger" not in r
    with pytest.raises(KeyError):
        r["ledger"]
    with pytest.raises(TypeError):
        r["model"] = "other"  # a record is never changed in place
    # with_fields makes another record, checked like any other: the original keeps its fields.
    annotated = r.with_fields(ledger={"compute": {}}, meter="proxy-dram")
    assert (annotated["ledger"], annotated.meter) == ({"compute": {}}, "proxy-dram")
    assert (r.meter, "ledger" in r) == ("wall", False)
    with pytest.raises(RecordError, match="quality_matched"):
        r.with_fields(quality_matched="yes")
def test_quality_entries_share_the_store(tmp_path):
    q = QualityStore(tmp_path, warn=lambda m: None)
    from un0_bench.harness.running.results import QualityEntry

    q.append([QualityEntry("sd", "digits", 8, 1, {"fid": 2.0}), QualityEntry("sd", "digits", 16, 1, {"fid": 1.0})])
    with q.path.open("a") as f:
        f.write('{"model": "un0", "backbone": "digits", "samples_requested": "8", "quality": {}}\n')
    assert q.figures("digits", 8, 1) == {"sd": {"fid": 2.0}}
    assert q.problems == [f"{q.path}:3: samples_requested: must be an integer, got '8'; skipped"]


def test_appends_are_strict_json(tmp_path):
    with pytest.raises(ValueError, match="invalid record: energy_j_per_image: must be a finite number or null, "
                                         "got nan"):
        ResultStore(tmp_path).append([{**record("sd"), "energy_j_per_image": float("nan")}])
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        ResultStore(tmp_path).append([{**record("sd"), "extra": float("inf")}])
    assert not (tmp_path / "results.jsonl").exists() or (tmp_path / "results.jsonl").read_text() == ""


def test_reader_fuzz_no_exception_every_good_record_kept_every_bad_line_reported(tmp_path):
    rng = random.Random(12)
    good_line = json.dumps({"schema": 2, **record("good")})
    wrong_types = [(k, v) for k in ("model", "backbone", "meter", "status") for v in ("", 3, None, [1])]
    wrong_types += [(k, v) for k in ("batch_size", "images") for v in ("4", -1, 0, True, 1.5, None)]
    wrong_types += [(k, v) for k in ("energy_j_per_image", "flops_per_image") for v in ("x", [1], True, {})]
    wrong_types += [("energy_ci95_j", v) for v in ("x", [1], [1, "a"], 2.0)]
    wrong_types += [(k, v) for k in ("config", "environment", "uncounted_ops") for v in ("x", [1, 2, 3], 5)]
    bad_makers = [
        lambda: good_line[: rng.randrange(1, len(good_line) - 1)],  # random truncation
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).replace(b"\n", b"x"),
        lambda: json.dumps({**record("w"), **dict([rng.choice(wrong_types)])}),
        lambda: json.dumps(rng.choice([[1, 2, 3], "text", 42, None, True, {}, {"model": "x"}])),
        lambda: "{" * rng.randrange(1, 3000),
    ]
    for trial in range(150):
        lines = []
        for _ in range(rng.randrange(1, 15)):
            if rng.random() < 0.5:
                lines.append(good_line.encode())
            else:
                made = rng.choice(bad_makers)()
                raw = made if isinstance(made, bytes) else made.encode()
                if not raw.strip():
                    raw = b"?"
                lines.append(raw)
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.7 else b"")
        d = tmp_path / str(trial)
        d.mkdir()
        (d / "results.jsonl").write_bytes(data)
        s = store(d)
        records = s.load()  # no exception escapes
        # A line is good iff it is the exact good line; every other line is reported with its number.
        kept = [i + 1 for i, raw in enumerate(lines) if raw == good_line.encode()]
        assert len(records) == len(kept) and all(r["model"] == "good" for r in records)
        reported = sorted(int(p[len(str(s.path)) + 1:].split(":")[0]) for p in s.problems)
        assert reported == [i + 1 for i, raw in enumerate(lines) if raw != good_line.encode()]
        # Appending after any of these starts on a line boundary and keeps every good record.
        s.append([record("after")])
        assert [r["model"] for r in s.load()][-1] == "after"
        assert len(s.load()) == len(kept) + 1


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_one_writer_at_a_time(tmp_path):
    s = store(tmp_path)
    holder = os.getppid()  # a live process that is not this one
    s.lock_path.write_text(f"{holder}\n")
    with pytest.raises(UserError) as e:
        with s.lock():
            pass
    assert str(e.value) == (f"{tmp_path} is being written by another run (process {holder}, lock {s.lock_path}); "
                            f"wait for it to finish or choose another --out")
    assert s.lock_path.read_text() == f"{holder}\n"  # the holder's lock is left alone


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path):
    s = store(tmp_path)
    dead = _dead_pid()
    s.lock_path.write_text(f"{dead}\n")
    with s.lock():
        assert s.lock_path.read_text() == f"{os.getpid()}\n"
    assert s.warned == [f"{s.lock_path}: took over a stale lock (process {dead}, no longer running)"]
    assert not s.lock_path.exists()  # released


def test_incomplete_record_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"invalid record: backbone: missing \(a record lacks backbone, "):
        ResultStore(tmp_path).append([{"model": "sd"}])


def test_unwritable_output_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_writable(f)
    with pytest.raises(UserError, match="cannot write"):
        check_writable(f / "sub")


def test_checking_a_folder_creates_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(UserError) as e:
            check_writable(ro / "out")
        assert str(e.value) == f"cannot write to output folder {ro / 'out'}: {ro} is not writable"
    finally:
        ro.chmod(0o700)
