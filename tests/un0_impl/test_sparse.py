import pytest
import torch
from un0_bench.harness.counters.ops import OpCounter, is_gating
from un0_bench.un0_impl.sparse import GatedMLP, PromptGate, SubnetCache, kept_units


def test_kept_units_rounds_and_keeps_at_least_one():
    assert kept_units(0.1, 6144) == 614  # round(614.4)
    assert kept_units(0.01, 6144) == 61  # round(61.44)
    assert kept_units(0.001, 6144) == 6  # round(6.144)
    assert kept_units(1e-9, 6144) == 1
    assert kept_units(1.0, 6144) == 6144


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan"), True])
def test_kept_units_refuses_keep_outside_range(keep):
    with pytest.raises(ValueError, match=r"keep must be a number > 0 and <= 1"):
        kept_units(keep, 100)


def _mlp(dim=8, hidden=40, blocks=2, seed=0):
    torch.manual_seed(seed)
    mlp = GatedMLP(dim, hidden, blocks).requires_grad_(False)
    with torch.no_grad():
        mlp.w2t.mul_(30.0)  # make the blocks far from the identity so a wrong unit would show
        mlp.b1.normal_()
    return mlp


def test_compact_equals_dense_masked():
    mlp = _mlp()
    index = torch.tensor([[1, 5, 7, 30], [0, 2, 39, 11]])  # (blocks, k)
    mask = torch.zeros(1, 2, 40)
    mask[0, 0, index[0]] = 1.0
    mask[0, 1, index[1]] = 1.0
    h = torch.randn(5, 8)
    with torch.no_grad():
        ref = mlp.forward_masked(h, mask.expand(5, -1, -1))
        got = mlp.gather(index)(h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # All units kept: the compact path is the dense layer.
    torch.testing.assert_close(mlp.gather(torch.arange(40).repeat(2, 1))(h), mlp.forward_masked(h),
                               rtol=1e-5, atol=1e-5)


def test_compact_flops_equal_hand_count():
    mlp = _mlp(dim=8, hidden=40, blocks=2)
    compact = mlp.gather(torch.tensor([[0, 1, 2], [3, 4, 5]]))  # k = 3 per block
    with OpCounter() as c:
        compact(torch.randn(4, 8))
    counts = c.counts(images=4)
    # Per block, B=4, D=8, k=3: layer norm 5*B*D = 160; addmm (B,D)@(D,k) 2*B*D*k = 192 (its bias
    # is not counted, as in torch's counter); relu B*k = 12; addmm (B,k)@(k,D) 2*B*k*D = 192.
    # 160 + 192 + 12 + 192 = 556 per block, x 2 blocks = 1112.
    assert counts.flops() == 1112
    assert counts.flops("gating") == 0


def test_gather_is_gating_and_moves_the_kept_rows():
    mlp = _mlp(dim=8, hidden=40, blocks=2)
    index = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with OpCounter() as c:
        mlp.gather(index)
    counts = c.counts(images=1)
    assert counts.flops("compute") == 0 and counts.bytes_moved("compute") == 0
    # Per block, k=3 rows of D=8 float32 from w1 and from w2t, 3 floats of b1; each index_select
    # reads its output's bytes plus the int64 index (3 x 8 bytes) and writes its output:
    # w1: 96 + 24 + 96 = 216; w2t: 216; b1: 12 + 24 + 12 = 48; 480 per block, x 2 = 960.
    # The compact network keeps a copy of the (2, 3) int64 index: 48 read + 48 written = 96.
    assert counts.bytes_moved("gating") == 960 + 96


def test_gate_module_is_marked_and_scores_every_unit():
    gate = PromptGate(classes=10, embed=4, blocks=3, hidden=7)
    assert is_gating(gate)
    assert gate(torch.tensor([1, 2])).shape == (2, 3, 7)
    with OpCounter() as c:
        gate(torch.tensor([1]))
    counts = c.counts(images=1)
    assert counts.flops("gating") >= 2 * 4 * 21 and counts.flops("compute") == 0  # the (1,4)@(4,21) matmul


class _Entry:
    def __init__(self, n):
        self.nbytes = n


def test_cache_counts_hits_misses_and_bytes():
    cache = SubnetCache()
    built = []

    def build(n):
        built.append(n)
        return _Entry(n)

    assert cache.get((3, 0.1), lambda: build(100)).nbytes == 100
    cache.get((3, 0.1), lambda: build(999))
    cache.get((4, 0.1), lambda: build(50))
    cache.get((3, 0.01), lambda: build(7))
    assert built == [100, 50, 7]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["entries"], s["bytes"]) == (1, 3, 3, 157)
    cache.clear()
    s = cache.stats()
    assert (s["hits"], s["misses"], s["entries"], s["bytes"]) == (0, 0, 0, 0)
    assert (s["evictions"], s["limit_bytes"]) == (0, None)


def test_cache_lookup_and_put_count_separately():
    cache = SubnetCache()
    assert cache.lookup("a") is None  # a miss by lookup alone counts nothing: put counts it
    assert (cache.hits, cache.misses) == (0, 0) and "a" not in cache
    cache.put("a", _Entry(10))
    assert (cache.hits, cache.misses) == (0, 1) and "a" in cache
    assert cache.lookup("a").nbytes == 10
    assert (cache.hits, cache.misses) == (1, 1)


def test_cache_evicts_least_recently_used_over_the_limit():
    cache = SubnetCache(limit_bytes=100)
    cache.get("a", lambda: _Entry(40))
    cache.get("b", lambda: _Entry(40))
    cache.get("a", lambda: _Entry(999))  # a hit makes "a" the most recent
    cache.get("c", lambda: _Entry(40))  # 120 bytes > 100: the least recent ("b") goes
    assert "b" not in cache and "a" in cache and "c" in cache
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["entries"], s["bytes"], s["limit_bytes"]) == (1, 3, 1, 2, 80, 100)
    assert s["keys"] == ["a", "c"]
    # An entry larger than the limit on its own is kept (never the entry just added); the rest go.
    cache.get("big", lambda: _Entry(500))
    s = cache.stats()
    assert (s["evictions"], s["entries"], s["bytes"], s["keys"]) == (3, 1, 500, ["big"])
    # "b" was evicted: using it again is a miss that builds it again.
    built = []
    cache.get("b", lambda: built.append(1) or _Entry(40))
    assert built == [1] and cache.stats()["misses"] == 5
    cache.clear()
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["entries"], s["limit_bytes"]) == (0, 0, 0, 0, 100)


def test_cache_without_limit_never_evicts():
    cache = SubnetCache()
    for k in range(20):
        cache.get(k, lambda: _Entry(1_000_000))
    assert cache.stats()["evictions"] == 0 and cache.stats()["entries"] == 20
