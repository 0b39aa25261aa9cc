import pytest
from un0_bench.harness.errors import UserError
from un0_bench.harness.results import REQUIRED_FIELDS, ResultStore, check_writable


def record(model, meter="wall"):
    r = {k: None for k in REQUIRED_FIELDS}
    r.update(model=model, backbone="digits", batch_size=4, meter=meter, status="ok")
    return r


def test_append_load_and_done(tmp_path):
    store = ResultStore(tmp_path)
    store.append([record("sd"), record("sd", "proxy")])
    store.append([record("sd:steps=10")])
    assert [r["model"] for r in store.load()] == ["sd", "sd", "sd:steps=10"]
    assert ("sd", "digits", 4, "proxy") in store.done()


def test_torn_last_line_is_ignored(tmp_path):
    store = ResultStore(tmp_path)
    store.append([record("sd")])
    with store.path.open("a") as f:
        f.write('{"model": "half')
    assert len(store.load()) == 1


def test_incomplete_record_is_refused(tmp_path):
    with pytest.raises(ValueError, match="required fields"):
        ResultStore(tmp_path).append([{"model": "sd"}])


def test_unwritable_output_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_writable(f)
    with pytest.raises(UserError, match="cannot write"):
        check_writable(f / "sub")
