import pytest
import torch
from un0_bench.backbones.teacher import UNET_CONFIG, load_teacher
from un0_bench.harness.errors import CheckpointError
from un0_bench.harness.weights.checkpoints import load_checkpoint
from un0_bench.training.pairs import teacher_pairs
from un0_bench.training.teacher import train_teacher


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


def test_teacher_pairs_reuse_a_cached_prefix(tmp_path, monkeypatch):
    import un0_bench.backbones.ddim as ddim

    calls: list[int] = []
    sample = ddim.ddim_sample

    def counted(unet, steps, noise, labels):
        calls.append(len(noise))
        return sample(unet, steps, noise, labels)

    # teacher_pairs runs the digits sampler through ddim_sample, one call per batch of pairs.
    monkeypatch.setattr(ddim, "ddim_sample", counted)
    monkeypatch.setenv("UN0_BENCH_CACHE", str(tmp_path / "a"))
    eight = teacher_pairs(8, steps=2, batch_size=4)
    assert calls == [4, 4]
    twelve = teacher_pairs(12, steps=2, batch_size=4)
    assert calls == [4, 4, 4]  # only the new batch ran
    assert all(torch.equal(x[:8], y) for x, y in zip(twelve, eight, strict=True))
    six = teacher_pairs(6, steps=2, batch_size=4)
    assert calls == [4, 4, 4] and all(torch.equal(x, y[:6]) for x, y in zip(six, eight, strict=True))
    # Extended or not, the pairs are bit for bit the ones a fresh cache makes.
    monkeypatch.setenv("UN0_BENCH_CACHE", str(tmp_path / "b"))
    fresh = teacher_pairs(12, steps=2, batch_size=4)
    assert all(torch.equal(x, y) for x, y in zip(fresh, twelve, strict=True))
    assert fresh[2].shape == (12, 1, 16, 16) and fresh[1].tolist() == [i % 10 for i in range(12)]
