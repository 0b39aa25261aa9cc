import json

import pytest
import torch
from un0_bench.backbones.digits import load_data
from un0_bench.backbones.judge import (
    JUDGE_CONFIG,
    JUDGE_FILE,
    build_judge,
    held_out_accuracy,
    load_judge,
)
from un0_bench.harness.errors import CheckpointError
from un0_bench.harness.weights.checkpoints import save_checkpoint


def test_shipped_judge_accuracy_is_recorded_and_reproduced():
    meta = json.loads(JUDGE_FILE.with_suffix(".json").read_text())
    assert meta["held_out_accuracy"] >= 0.95
    assert meta["held_out_images"] == 360
    judge, loaded_meta = load_judge()
    assert loaded_meta == meta
    correct, total = held_out_accuracy(judge)
    assert (correct, total) == (meta["held_out_correct"], meta["held_out_images"])
    assert correct / total == meta["held_out_accuracy"]


def test_shipped_judge_records_how_it_was_made():
    meta = json.loads(JUDGE_FILE.with_suffix(".json").read_text())
    assert meta["command"].startswith("un0-bench train judge")
    assert meta["config"] == JUDGE_CONFIG
    assert meta["energy"]["proxy"]["status"] == "ok" and meta["energy"]["proxy"]["energy_j"] > 0
    assert meta["energy"]["wall"]["status"] == "ok"
    assert meta["data_sha256"] == load_data().sha256
    assert JUDGE_FILE.stat().st_size < 2 * 1024 * 1024


def test_shapes():
    judge = build_judge().eval()
    x = torch.zeros(5, 1, 16, 16)
    assert judge(x).shape == (5, JUDGE_CONFIG["classes"])
    assert judge.features(x).shape == (5, JUDGE_CONFIG["features"])
    assert judge.num_features == JUDGE_CONFIG["features"]


def test_load_refuses_a_file_for_another_config(tmp_path):
    other = dict(JUDGE_CONFIG, features=32)
    path = tmp_path / "judge.safetensors"
    save_checkpoint(path, {"w": torch.zeros(1)}, {"config": other})
    with pytest.raises(CheckpointError, match="features: model has 64, file has 32"):
        load_judge(path)
