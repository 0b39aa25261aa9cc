import torch
import un0_bench.backbones.teacher as teacher
from un0_bench.harness.weights.checkpoints import save_checkpoint
from un0_bench.training import oscillator
from un0_bench.training.oscillator import train_oscillator
from un0_bench.un0_impl.oscillator import load_oscillator


def test_trainer_writes_loadable_weights_with_energy(tmp_path, monkeypatch):
    parent = tmp_path / "teacher.safetensors"
    save_checkpoint(parent, {"w": torch.zeros(1)}, {"config": {}, "energy": {"wall": {"energy_j": 1.0}}})
    monkeypatch.setattr(teacher, "TEACHER_FILE", parent)

    def fake_pairs(n):
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10, torch.rand(n, 1, 16, 16, generator=g)

    monkeypatch.setattr(oscillator, "teacher_pairs", fake_pairs)
    # The pairs' cost comes from the one estimator (tests/training/test_lineage.py checks it on the teacher).
    pairs_cost = {"energy": {"proxy": {"status": "ok", "energy_j": 2.5, "flops": 7}}, "pairs": 4096,
                  "teacher_steps": 50}
    monkeypatch.setattr(oscillator, "teacher_pairs_energy", lambda n: pairs_cost if n == 4096 else None)
    monkeypatch.setattr("un0_bench.harness.weights.derivation._TRAINING_METERS", ("wall",))
    out = tmp_path / "osc.safetensors"
    meta = train_oscillator(steps=2, seed=0, out=out, n=256)
    assert meta["energy"]["proxy"]["status"] == "ok" and meta["energy"]["proxy"]["energy_j"] > 0
    assert meta["energy"]["includes"] == {"teacher": {"wall": {"energy_j": 1.0}}, "teacher_pairs": pairs_cost["energy"]}
    assert meta["config"]["n"] == 256 and meta["train"]["steps"] == 2
    net, loaded = load_oscillator(out)
    assert loaded["command"].startswith("un0-bench train un0-osc --steps 2 --seed 0")
    torch.testing.assert_close(net.dynamics.coupling, net.dynamics.coupling.T, atol=0, rtol=0)
