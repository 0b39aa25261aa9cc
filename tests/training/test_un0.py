import torch
from un0_bench.harness import derivation
from un0_bench.harness.checkpoints import load_checkpoint
from un0_bench.harness.generator import GenerationRequest
from un0_bench.training.un0 import train_un0
from un0_bench.un0_impl.gated import Un0Generator, Un0Net, unpack_state

from tests.un0_impl.test_gated import TINY


def test_trainer_writes_loadable_int8_weights(tmp_path, monkeypatch):
    # Keep the test fast: no whole-host meters (their startup dominates a two-step run).
    monkeypatch.setattr(derivation, "_TRAINING_METERS", ("wall",))
    n = 100
    g = torch.Generator().manual_seed(0)
    pairs = (torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10,
             torch.rand(n, 1, 16, 16, generator=g) * 2 - 1)
    out = tmp_path / "un0.safetensors"
    meta = train_un0(steps=2, seed=1, out=out, config=TINY, pairs=pairs)
    assert meta["config"] == TINY and meta["energy"]["proxy"]["energy_j"] > 0
    assert meta["train"]["steps"] == 2 and "un0-bench train un0 --steps 2 --seed 1" == meta["command"]
    state, _ = load_checkpoint(out, expected_config=TINY)
    assert state["mlp.w1"].dtype == torch.int8 and state["mlp.w1.scale"].shape == (2, 64, 1)
    assert state["gate.score.weight"].dtype == torch.float16 and state["z_in.weight"].dtype == torch.float32
    net = Un0Net.from_config(TINY)
    net.load_state_dict(unpack_state(state))
    img = Un0Generator(net).generate(GenerationRequest(("4",), seed=0, batch_size=1)).images
    assert img.shape == (1, 1, 16, 16)
