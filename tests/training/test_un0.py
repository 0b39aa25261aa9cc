import torch
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.weights import derivation
from un0_bench.harness.weights.checkpoints import load_checkpoint
from un0_bench.training.un0 import forward_band, gather_band, train_un0
from un0_bench.un0_impl.gated import Un0Generator, Un0Net, unpack_state

from tests.un0_impl.test_gated import TINY
from tests.un0_impl.test_sparse import _mlp


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


def test_forward_band_matches_masked_dense():
    mlp = _mlp(dim=8, hidden=40, blocks=2)
    index = torch.stack([torch.tensor([[3, 9, 1], [0, 7, 8]]), torch.tensor([[5, 6, 2], [39, 1, 4]])])  # (G=2, L, 3)
    band_mask = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])
    h = torch.randn(2, 3, 8)  # (G, B, D)
    with torch.no_grad():
        got = forward_band(h, gather_band(mlp, index), band_mask)
        for g in range(2):
            dense_mask = torch.zeros(1, 2, 40)
            for b in range(2):
                dense_mask[0, b, index[g, b]] = band_mask[g, b]
            torch.testing.assert_close(got[g], mlp.forward_masked(h[g], dense_mask.expand(3, -1, -1)),
                                       rtol=1e-5, atol=1e-5)


def test_band_gradient_reaches_only_gathered_units():
    mlp = _mlp(dim=8, hidden=40, blocks=2).requires_grad_(True)
    index = torch.tensor([[[3, 9], [0, 7]]])  # (G=1, L=2, band=2)
    forward_band(torch.randn(1, 4, 8), gather_band(mlp, index), torch.ones(1, 2, 2)).sum().backward()
    touched = mlp.w1.grad.abs().sum(-1) > 0  # (L, hidden)
    assert touched.nonzero().tolist() == [[0, 3], [0, 9], [1, 0], [1, 7]]
