import json
import pickle

import pytest
import torch
from un0_bench.harness.errors import CheckpointError
from un0_bench.harness.weights.checkpoints import load_checkpoint, save_checkpoint

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


def _raw_safetensors(path, header, data=b""):
    import struct

    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    path.with_suffix(".json").write_text(json.dumps({"config": CONFIG}))
    return path


@pytest.mark.parametrize("header, message", [
    ({}, "holds no tensors (empty safetensors header)"),
    ({"__metadata__": {"format": "pt"}}, "holds no tensors (empty safetensors header)"),
    ([1, 2], "not a safetensors file (header is a JSON list, expected an object of tensors)"),
    ("text", "not a safetensors file (header is a JSON str, expected an object of tensors)"),
    ({"w": {"dtype": "F32", "shape": [1]}},
     "bad safetensors header (tensor 'w': expected data_offsets [start, end] with 0 <= start <= end, got None)"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
     "bad safetensors header (tensor 'w': expected data_offsets [start, end] with 0 <= start <= end, got [4, 0])"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}},
     "bad safetensors header (tensor 'w': expected data_offsets [start, end] with 0 <= start <= end, got '0-4')"),
    ({"w": 7}, "bad safetensors header (tensor 'w': expected data_offsets [start, end] with 0 <= start <= end, "
               "got 7)"),
    ({"w": {"dtype": "F32", "data_offsets": [0, 4]}},
     "bad safetensors header (tensor 'w': expected a dtype and a shape)"),
    ({"__metadata__": [1], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
     "bad safetensors header (__metadata__ must be an object of strings)"),
])
def test_bad_headers_are_one_clear_error_naming_the_file(tmp_path, header, message):
    path = _raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, expected_config=CONFIG)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("metadata, message", [
    ("[1, 2]", "metadata is a JSON list, expected an object"),
    ('"x"', "metadata is a JSON str, expected an object"),
    ('{"command": "x"}', "metadata has no config object (expected the model's config)"),
    ('{"config": [1]}', "metadata has no config object (expected the model's config)"),
])
def test_metadata_that_is_not_an_object_is_refused(ckpt, metadata, message):
    meta = ckpt.with_suffix(".json")
    meta.write_text(metadata)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, expected_config=CONFIG)
    assert str(e.value) == f"{meta}: {message}"


def test_another_models_weights_in_a_models_place_is_one_clear_error(tmp_path):
    from un0_bench.harness.weights.checkpoints import load_into

    path = tmp_path / "m.safetensors"
    foreign = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    save_checkpoint(path, foreign.state_dict(), {"config": CONFIG})
    state, _ = load_checkpoint(path, expected_config=CONFIG)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(CheckpointError) as e:
        load_into(model, state, path)
    assert str(e.value) == (f"{path}: not the weights of this model (Sequential): 2 tensors it does not have "
                            f"(first: 1.bias); 2 of other shapes (first: 0.weight is (5, 3), expected (4, 3))")
    own = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    load_into(own, state, path)
    assert torch.equal(own[1].weight, foreign[1].weight)


def test_a_file_that_cannot_be_unpacked_is_one_clear_error(tmp_path):
    from un0_bench.harness.weights.checkpoints import unpacked

    with pytest.raises(CheckpointError) as e:
        unpacked(lambda s: {"w": s["w"] * s["w.scale"]}, {"w": torch.ones(1)}, tmp_path / "m.safetensors")
    assert str(e.value) == f"{tmp_path / 'm.safetensors'}: not the weights of this model (cannot unpack them: " \
                           f"KeyError: 'w.scale')"
