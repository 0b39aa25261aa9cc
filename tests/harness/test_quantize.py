import torch
from un0_bench.harness.weights.quantize import quantize_per_channel


def test_one_scale_per_channel_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.1, 0.2, -0.3]])
    q, scale = quantize_per_channel(w)
    # Channel 0: max |w| = 2, scale 2/127; 1 / (2/127) = 63.5 rounds to even 64, 0.5 -> 31.75 -> 32.
    # Channel 1 is all zero: scale 1.0, codes 0. Channel 2: scale 0.3/127; 0.1 -> 42.33 -> 42, 0.2 -> 84.67 -> 85.
    assert scale.tolist() == [torch.tensor(2.0 / 127).item(), 1.0, (torch.tensor(0.3) / 127).item()]
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [42, 85, -127]]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    neg_q, neg_scale = quantize_per_channel(-w)
    assert torch.equal(neg_q, -q) and torch.equal(neg_scale, scale)  # symmetric: -w quantises to -q


def test_a_channel_is_everything_in_weight_c():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)  # (O, C, kh, kw): a convolution's weight
    q, scale = quantize_per_channel(w)
    assert q.shape == w.shape and scale.shape == (4,)
    torch.testing.assert_close(scale, w.reshape(4, -1).abs().amax(dim=1) / 127, rtol=0, atol=0)
    # Every weight within half a step of its channel's grid, and each channel's max |w| on the grid's end.
    assert bool(((q.float() * scale.view(-1, 1, 1, 1) - w).abs() <= scale.view(-1, 1, 1, 1) / 2 + 1e-7).all())
    assert q.reshape(4, -1).abs().amax(dim=1).tolist() == [127] * 4
