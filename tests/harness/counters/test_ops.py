import pytest
import torch
import torch.nn.functional as F
from torch import nn
from un0_bench.harness.counters.ops import (
    OpCounter,
    count,
    counting_active,
    gating_scope,
    mark_gating,
    op_dtype,
    register_formula,
)
from un0_bench.harness.counters.records import Counts

aten = torch.ops.aten


def _by_op(counts: Counts, op: str) -> list:
    return [s for s in counts.stats if s.op == op]


def _flops(counts: Counts, op: str) -> int:
    return sum(s.flops for s in _by_op(counts, op))


def test_linear_counts_the_matmul_of_addmm():
    torch.manual_seed(0)
    lin = nn.Linear(5, 7)
    x = torch.randn(3, 5)
    with torch.no_grad():
        c = count(lin, x, images=3)
    (addmm,) = _by_op(c, "aten.addmm.default")
    # x (3,5) @ W^T (5,7): 2*3*5*7 = 210. The bias add inside addmm is not included (torch's
    # flop_counter convention: addmm is charged as its matmul).
    assert addmm.flops == 210
    assert (addmm.dtype, addmm.role, addmm.module, addmm.calls, addmm.counted) == ("float32", "compute", "", 1, True)
    # addmm reads bias (7) + x (15) + W^T (35) floats = 57*4 = 228 bytes, writes 3*7*4 = 84.
    assert (addmm.bytes_read, addmm.bytes_written) == (228, 84)
    assert c.images == 3
    assert c.uncounted_ops() == {}


def test_grouped_conv2d():
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2, bias=False)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        c = count(conv, x, images=2)
    # 2 * Cin/groups * k*k * Cout * Hout*Wout * N = 2 * 2 * 9 * 6 * 25 * 2 = 10800
    assert _flops(c, "aten.convolution.default") == 10800


def test_bmm():
    a, b = torch.randn(4, 3, 5), torch.randn(4, 5, 2)
    c = count(torch.bmm, a, b, images=1)
    # 2 * batch * M * K * N = 2 * 4 * 3 * 5 * 2 = 240
    assert _flops(c, "aten.bmm.default") == 240


def test_cpu_attention_is_counted():
    q = torch.randn(2, 3, 4, 8)  # (B, H, Sq, D)
    k = torch.randn(2, 3, 6, 8)  # (B, H, Skv, D)
    v = torch.randn(2, 3, 6, 8)
    c = count(F.scaled_dot_product_attention, q, k, v, images=1)
    (st,) = _by_op(c, "aten._scaled_dot_product_flash_attention_for_cpu.default")
    # Q@K^T: 2*B*H*Sq*D*Skv = 2*2*3*4*8*6 = 2304; P@V: 2*B*H*Sq*Skv*D = 2304; 4*B*H*Sq*Skv*D = 4608
    assert st.flops == 4608
    assert st.counted


def test_pointwise_and_bytes_of_an_add():
    a, b = torch.ones(4, 4), torch.ones(4, 4)
    c = count(torch.add, a, b, images=1)
    (st,) = _by_op(c, "aten.add.Tensor")
    # 1 FLOP per output element: 16. Reads two float32 (4,4) = 2*16*4 = 128 bytes, writes 64.
    assert (st.flops, st.bytes_read, st.bytes_written) == (16, 128, 64)


def test_activation_is_one_flop_per_element():
    c = count(torch.sigmoid, torch.randn(3, 4), images=1)
    assert _flops(c, "aten.sigmoid.default") == 12  # 3*4 elements, 1 each


def test_softmax_and_group_norm_constants():
    x = torch.randn(2, 4, 3, 3)  # 72 elements
    gn = nn.GroupNorm(2, 4)

    def f(x):
        return gn(x).softmax(-1)

    with torch.no_grad():
        c = count(f, x, images=1)
    assert _flops(c, "aten.native_group_norm.default") == 5 * 72  # NORM_FLOPS_PER_ELEMENT = 5
    assert _flops(c, "aten._softmax.default") == 5 * 72  # SOFTMAX_FLOPS_PER_ELEMENT = 5


def test_reduction_is_one_flop_per_input_element():
    c = count(torch.sum, torch.randn(6, 7), images=1)
    assert _flops(c, "aten.sum.default") == 42  # 6*7 inputs accumulated


def test_views_move_no_bytes_but_are_counted():
    x = torch.randn(4, 6)

    def f(x):
        return x.view(6, 4).t().contiguous()

    c = count(f, x, images=1)
    (view,) = _by_op(c, "aten.view.default")
    (t,) = _by_op(c, "aten.t.default")
    (clone,) = _by_op(c, "aten.clone.default")
    assert (view.flops, view.bytes_read, view.bytes_written, view.counted) == (0, 0, 0, True)
    assert (t.flops, t.bytes_read, t.bytes_written, t.counted) == (0, 0, 0, True)
    # the copy that makes it contiguous reads and writes 24 floats: 96 bytes each way, no FLOPs
    assert (clone.flops, clone.bytes_read, clone.bytes_written, clone.counted) == (0, 96, 96, True)


def test_gather_reads_only_the_selected_rows():
    w = torch.randn(10, 4)
    idx = torch.tensor([1, 7])
    c = count(torch.index_select, w, 0, idx, images=1)
    (st,) = _by_op(c, "aten.index_select.default")
    # reads the 2 selected rows (2*4*4 = 32 bytes) and the int64 index (2*8 = 16): 48; writes 32.
    assert (st.flops, st.bytes_read, st.bytes_written) == (0, 48, 32)


def test_module_path_with_and_without_root():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    with torch.no_grad():
        with_root = count(model, x, images=1)
        with OpCounter() as oc:
            model(x)
        no_root = oc.counts(images=1)
    mods = {s.op: set() for s in with_root.stats}
    for s in with_root.stats:
        mods[s.op].add(s.module)
    assert mods["aten.addmm.default"] == {"0", "2.0"}
    assert mods["aten.relu.default"] == {"1"}
    assert {s.module for s in no_root.stats if s.op == "aten.addmm.default"} == {"Sequential.0", "Sequential.2.0"}
    # 2*5*3*4 = 120 for the first linear, 2*5*4*2 = 80 for the second
    assert {s.module: s.flops for s in with_root.stats if s.op == "aten.addmm.default"} == {"0": 120, "2.0": 80}


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = mark_gating(nn.Sequential(nn.Linear(4, 3)))
        self.body = nn.Linear(4, 4)

    def forward(self, x):
        scores = self.gate(x)  # (B, 3): gating, including the Linear inside the marked container
        with gating_scope():
            kept = torch.index_select(self.body.weight, 0, scores.argmax(-1))  # gather of kept rows
        return self.body(x) + kept.sum()


def test_gating_attribution():
    model = _Gated()
    x = torch.randn(2, 4)
    with torch.no_grad():
        c = count(model, x, images=2)
    gating = {(s.op, s.module) for s in c.stats if s.role == "gating"}
    assert ("aten.addmm.default", "gate.0") in gating
    assert ("aten.index_select.default", "") in gating
    assert ("aten.argmax.default", "") in gating
    compute = {(s.op, s.module) for s in c.stats if s.role == "compute"}
    assert ("aten.addmm.default", "body") in compute
    assert ("aten.sum.default", "") in compute  # outside the scope
    assert c.flops("gating") == 2 * 2 * 4 * 3 + 2 * 3  # gate matmul 2*B*4*3 = 48, argmax over 6 = 6
    # the scope is closed: nothing left behind
    with torch.no_grad():
        after = count(torch.index_select, model.body.weight, 0, torch.tensor([0]), images=1)
    assert {s.role for s in after.stats} == {"compute"}


def test_backward_of_gating_ops_is_gating():
    gate = mark_gating(nn.Linear(4, 3))
    body = nn.Linear(4, 3)
    root = nn.ModuleDict({"gate": gate, "body": body})
    x = torch.randn(2, 4)
    with OpCounter(root=root) as oc:
        (body(x) * gate(x).sigmoid()).sum().backward()
    bwd = {(s.module, s.role, s.flops) for s in oc.counts(images=2).stats if s.op == "aten.mm.default"}
    # weight gradients: grad_out^T (3,2) @ x (2,4) = 2*3*2*4 = 48 FLOPs each, gate's charged as gating
    assert bwd == {("gate", "gating", 48), ("body", "compute", 48)}
    sig = [(s.module, s.role) for s in oc.counts(images=2).stats if s.op == "aten.sigmoid_backward.default"]
    assert sig == [("", "compute")]  # the sigmoid ran outside both modules


def test_uncounted_op_is_listed():
    c = count(torch.sort, torch.randn(5), images=1)
    (st,) = _by_op(c, "aten.sort.default")
    assert st.counted is False and st.flops == 0
    assert c.uncounted_ops() == {"aten.sort.default": 1}


def test_int8_matmul_formula_and_dtype():
    a = torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    b = torch.randint(-8, 8, (64, 16), dtype=torch.int8)
    c = count(torch._int_mm, a, b, images=1)
    (st,) = _by_op(c, "aten._int_mm.default")
    assert st.flops == 2 * 32 * 64 * 16  # 2*M*K*N = 65536
    assert st.dtype == "int8"
    assert c.flops_by_dtype() == {"int8": 65536}


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")
@pytest.mark.skipif(not {"x86", "fbgemm", "qnnpack"} & set(torch.backends.quantized.supported_engines),
                    reason="no quantized CPU engine in this torch build")
def test_quantized_conv_and_dynamic_linear_are_int8():
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    conv = nnq.Conv2d(2, 4, 3)
    x = torch.quantize_per_tensor(torch.randn(1, 2, 5, 5), 0.1, 0, torch.quint8)
    lin = nnqd.Linear(5, 7)
    with OpCounter() as oc:
        conv(x)
        lin(torch.randn(3, 5))
    c = oc.counts(images=1)
    (qc,) = _by_op(c, "quantized.conv2d.new")
    (ql,) = _by_op(c, "quantized.linear_dynamic.default")
    assert (qc.flops, qc.dtype) == (2 * 2 * 9 * 4 * 3 * 3 * 1, "int8")  # 2*Cin*k*k*Cout*Ho*Wo*N = 1296
    assert (ql.flops, ql.dtype) == (2 * 3 * 5 * 7, "int8")  # float input quantised on the fly: 210
    # the packed int8 weight (4*2*3*3 = 72 bytes) and float bias (4*4 = 16) count as read, plus x (50)
    assert qc.bytes_read == 72 + 16 + 50


def test_op_dtype_rule():
    mask = torch.tensor([True, False])
    a = torch.ones(2, dtype=torch.bfloat16)
    assert op_dtype(aten.where.self, (mask, a, a)) == "bfloat16"  # first non-bool input
    assert op_dtype(aten.index_select.default, (a, 0, torch.tensor([0]))) == "bfloat16"
    assert op_dtype(aten.zeros.default, ([2],), {}, torch.zeros(2, dtype=torch.float16)) == "float16"


@torch.library.custom_op("un0_bench_test::scale2", mutates_args=())
def _scale2(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_scale2.register_fake
def _(x):
    return torch.empty_like(x)


def test_register_formula_decorator():
    @register_formula(torch.ops.un0_bench_test.scale2)
    def _scale2_flop(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 7 * x_shape[0]

    c = count(torch.ops.un0_bench_test.scale2, torch.ones(3), images=1)
    (st,) = _by_op(c, "un0_bench_test.scale2.default")
    assert (st.flops, st.counted) == (21, True)  # 7 * 3 from the registered formula
    with pytest.raises(RuntimeError, match="duplicate"):
        register_formula(torch.ops.un0_bench_test.scale2)(_scale2_flop)


def test_backward_is_counted_and_attributed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3))
    x = torch.randn(1, 1, 6, 6)
    with OpCounter(root=model) as oc:
        model(x).sum().backward()
    c = oc.counts(images=1)
    fwd = {s.module: s.flops for s in c.stats if s.op == "aten.convolution.default"}
    bwd = {s.module: s.flops for s in c.stats if s.op == "aten.convolution_backward.default"}
    # conv "0": 2*1*9*2*(4*4)*1 = 576; conv "2": 2*2*9*3*(2*2)*1 = 432
    assert fwd == {"0": 576, "2": 432}
    # backward: "0" needs only the weight gradient (x needs no grad): 576; "2" computes the input
    # and the weight gradients: 2*432 = 864
    assert bwd == {"0": 576, "2": 864}
    relu_bwd = [s for s in c.stats if s.op == "aten.threshold_backward.default"]
    assert [(s.module, s.flops) for s in relu_bwd] == [("1", 2 * 4 * 4)]  # one per element of (1,2,4,4)


def test_counting_active_only_inside_and_images_checked():
    assert not counting_active()
    with OpCounter() as oc:
        assert counting_active()
    assert not counting_active()
    with pytest.raises(ValueError, match="positive"):
        oc.counts(images=0)


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10,
    )


def _shape_recorder(into: dict, key):
    def hook(lin, inp, out) -> None:  # returns None so the output is left alone
        into[key] = tuple(inp[0].shape)

    return hook


def test_unet_forward_matches_hand_count_from_shapes():
    from diffusers.models.attention_processor import Attention

    unet = _tiny_unet().eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 5])
    y = torch.tensor([1, 7])

    hand = {"conv": 0, "linear": 0, "attention": 0}
    q_in: dict[Attention, tuple] = {}
    kv_in: dict[Attention, tuple] = {}
    handles = []

    def conv_hook(m, inp, out):
        n, cin = inp[0].shape[:2]
        cout, ho, wo = out.shape[1:]
        kh, kw = m.kernel_size
        # 2 * Cin/groups * kh*kw * Cout * Hout*Wout * N
        hand["conv"] += 2 * (cin // m.groups) * kh * kw * cout * ho * wo * n

    def linear_hook(m, inp, out):
        rows = inp[0].numel() // m.in_features
        hand["linear"] += 2 * rows * m.in_features * m.out_features  # 2*M*K*N, bias not counted

    for m in unet.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        if isinstance(m, Attention):
            handles.append(m.to_q.register_forward_hook(_shape_recorder(q_in, m)))
            handles.append(m.to_k.register_forward_hook(_shape_recorder(kv_in, m)))

    with torch.no_grad():
        c = count(unet, x, t, class_labels=y, images=2)
    for h in handles:
        h.remove()

    # Attention: q, k, v of (B, S, C) are split into `heads` heads of D = inner_dim / heads; the two
    # batched matmuls cost 4 * B * heads * Sq * Skv * D (softmax not counted, as in torch).
    for a, (b, sq, _) in q_in.items():
        skv = kv_in[a][1]
        d = a.inner_dim // a.heads
        hand["attention"] += 4 * b * a.heads * sq * skv * d
    assert len(q_in) == 4  # one attention in the down block, one in the mid block, two in the up block
    # 16 channels at 4x4 = 16 tokens, 2 heads of 8: 4 * 2 * 2 * 16 * 16 * 8 = 32768 per call
    assert hand["attention"] == 4 * 32768

    counted = {
        "conv": _flops(c, "aten.convolution.default"),
        "linear": _flops(c, "aten.addmm.default") + _flops(c, "aten.mm.default"),
        "attention": _flops(c, "aten._scaled_dot_product_flash_attention_for_cpu.default"),
    }
    assert counted == hand
    # no other matmul-like op hides elsewhere, and nothing ran uncounted
    assert not [s.op for s in c.stats if "bmm" in s.op or "_efficient_attention" in s.op]
    assert c.uncounted_ops() == {}
    assert {s.module for s in _by_op(c, "aten._scaled_dot_product_flash_attention_for_cpu.default")} == {
        "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
    }


def test_training_step_with_adamw_runs_fully_counted():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, target = torch.randn(3, 4), torch.zeros(3, 2)
    with OpCounter(root=model) as oc:
        F.mse_loss(model(x), target).backward()
        opt.step()
    c = oc.counts(images=3)
    assert c.uncounted_ops() == {}  # optimizer pointwise ops counted, profiler markers skipped
    # forward addmm 2*3*4*2 = 48; backward weight-gradient mm (2,3)@(3,4) = 2*2*3*4 = 48 (the
    # input x needs no gradient, so there is no input-gradient mm)
    assert _flops(c, "aten.addmm.default") == 48
    assert _flops(c, "aten.mm.default") == 48
    assert _flops(c, "aten.mse_loss.default") == 3 * 6  # MSE_FLOPS_PER_ELEMENT x 3*2 outputs
    assert _flops(c, "aten.addcdiv_.default") == 8 + 2  # AdamW update, 1 per element of W (2,4) and b (2,)
