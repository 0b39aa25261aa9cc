import pytest

from backbones.teacher import UNET_CONFIG, load_teacher, train_teacher
from harness.checkpoints import load_checkpoint
from harness.errors import CheckpointError


def test_train_writes_weights_and_metadata(tmp_path):
    out = tmp_path / "teacher.safetensors"
    meta = train_teacher(out=out, steps=2, batch_size=4, seed=3)
    state, saved = load_checkpoint(out, expected_config=UNET_CONFIG)
    assert saved == meta and len(state) > 50
    assert meta["command"] == "un0-bench train teacher --steps 2 --batch-size 4 --seed 3"
    assert meta["energy"]["proxy"]["energy_j"] > 0 and meta["energy"]["wall"]["status"] == "ok"
    # A meter that cannot run here is recorded with its reason, not as 0 J.
    assert meta["energy"]["rapl"]["energy_j"] is None and meta["energy"]["rapl"]["status"].startswith("unavailable")
    unet, _ = load_teacher(out)
    assert sum(p.numel() for p in unet.parameters()) == 1_114_081


def test_load_refuses_a_file_made_for_another_config(tmp_path):
    import json

    out = tmp_path / "teacher.safetensors"
    train_teacher(out=out, steps=1, batch_size=2)
    meta = json.loads(out.with_suffix(".json").read_text())
    meta["config"]["block_out_channels"] = [16, 32, 32]
    out.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="block_out_channels"):
        load_teacher(out)
