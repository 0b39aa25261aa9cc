import json
import pickle

import pytest
import torch
from un0_bench.harness.checkpoints import load_checkpoint, save_checkpoint
from un0_bench.harness.errors import CheckpointError

CONFIG = {"width": 4}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"config": CONFIG, "command": "x"})
    return path


def test_round_trip(ckpt):
    state, meta = load_checkpoint(ckpt, expected_config=CONFIG)
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))
    assert meta["command"] == "x"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(ckpt):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ckpt)


def test_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": 1}))
    (tmp_path / "evil.json").write_text(json.dumps({"config": CONFIG}))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)


def test_wrong_suffix(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a .safetensors file"):
        load_checkpoint(path)


def test_config_mismatch_names_both(ckpt):
    with pytest.raises(CheckpointError, match="width: model has 8, file has 4"):
        load_checkpoint(ckpt, expected_config={"width": 8})
