"""Real architectures on the meta device: built from shipped configs, counted, never run."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from un0_bench.backbones.archs import ARCH_NAMES, ArchBackbone, FusedAttention, arch_config, count_arch
from un0_bench.backbones.hf import build_on_meta
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator
from un0_bench.harness.counters.ops import OpCounter, count
from un0_bench.harness.errors import StackError, UserError
from un0_bench.harness.measuring.protocol import count_phase_occurrences
from un0_bench.harness.running.record import Record

MATMUL_OPS = ("convolution", "addmm", "mm", "bmm", "_scaled_dot_product_flash_attention_for_cpu")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Counting needs no weights and no network: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("counting tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- the hand count of one SD 1.5 UNet forward -------------------------------------------------
# One MAC = 2 FLOPs. Only convolutions, linears and the two attention matmuls are counted here;
# the counter's total adds norms, activations and residual adds (about 0.1%).


def _conv(k, cin, cout, h, w):
    return 2 * k * k * cin * cout * h * w  # 2 k^2 Cin Cout H W


def _resnet(cin, cout, h, w, temb=1280):
    # conv1 3x3 Cin->Cout, conv2 3x3 Cout->Cout, the time-embedding projection 1280->Cout, and a
    # 1x1 shortcut when the width changes.
    f = _conv(3, cin, cout, h, w) + _conv(3, cout, cout, h, w) + 2 * temb * cout
    return f + (_conv(1, cin, cout, h, w) if cin != cout else 0)


def _transformer(c, h, w, text_len=77, text_dim=768):
    # S = H W tokens of width C; SD 1.5 projects in and out with 1x1 convs (use_linear_projection false).
    s = h * w
    proj = 2 * (2 * s * c * c)  # proj_in, proj_out
    self_attn = 4 * (2 * s * c * c) + 2 * (2 * s * s * c)  # q, k, v, out (C x C); Q K^T and P V over all heads
    cross = (2 * (2 * s * c * c)  # q and out
             + 2 * (2 * text_len * text_dim * c)  # k and v from the 77 x 768 text states
             + 2 * (2 * s * text_len * c))  # Q K^T and P V against 77 text tokens
    ff = 2 * s * c * 8 * c + 2 * s * 4 * c * c  # GEGLU C -> 2 x 4C, then 4C -> C
    return proj + self_attn + cross + ff


def sd15_unet_hand_flops(h=64):
    """FLOPs of one SD 1.5 UNet forward for one image at h x h latents, from its config.json."""
    f = _conv(3, 4, 320, h, h)  # conv_in
    f += 2 * 320 * 1280 + 2 * 1280 * 1280  # time embedding MLP 320 -> 1280 -> 1280
    chans, res = [320, 640, 1280, 1280], [h, h // 2, h // 4, h // 8]
    cin, skips = 320, [320]
    for i, (c, r) in enumerate(zip(chans, res, strict=True)):  # down: 2 resnets (+ 2 transformers on the first three)
        for _ in range(2):
            f += _resnet(cin, c, r, r) + (_transformer(c, r, r) if i < 3 else 0)
            cin = c
            skips.append(c)
        if i < 3:
            f += _conv(3, c, c, r // 2, r // 2)  # 3x3 stride-2 downsample
            skips.append(c)
    r = res[3]
    f += _resnet(1280, 1280, r, r) + _transformer(1280, r, r) + _resnet(1280, 1280, r, r)  # mid block
    prev = 1280
    for i, (c, r) in enumerate(zip(reversed(chans), reversed(res), strict=True)):  # up: 3 resnets on concatenated skips
        for _ in range(3):
            f += _resnet(prev + skips.pop(), c, r, r) + (_transformer(c, r, r) if i > 0 else 0)
            prev = c
        if i < 3:
            f += _conv(3, c, c, 2 * r, 2 * r)  # nearest 2x upsample, then a 3x3 conv
    return f + _conv(3, 320, 4, h, h)  # conv_out


def test_sd15_unet_forward_on_meta_equals_the_hand_count():
    cfg = arch_config("sd15")["denoiser"]["config"]
    unet = build_on_meta("UNet2DConditionModel", cfg)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert all(p.device.type == "meta" for p in unet.parameters())
    # One classifier-free-guidance forward: the two halves as a batch of 2, 64x64 latents, 77 tokens.
    x = torch.empty(2, 4, 64, 64, device="meta")
    text = torch.empty(2, 77, 768, device="meta")
    with FusedAttention():
        c = count(unet, x, torch.tensor(999), encoder_hidden_states=text, images=2)
    hand = 2 * sd15_unet_hand_flops(64)
    assert hand == 1_606_546_882_560
    matmuls = sum(s.flops for s in c.stats if s.op.split(".")[1] in MATMUL_OPS)
    assert matmuls == hand  # every convolution, linear and attention matmul, exactly
    assert c.flops() == pytest.approx(hand, rel=0.01)
    assert c.flops() == pytest.approx(1.607e12, rel=0.01)  # the figure the issue reports


def test_attention_on_meta_is_counted_as_the_fused_kernel_in_the_input_dtype():
    q = torch.empty(2, 8, 4096, 40, device="meta", dtype=torch.float16)
    with FusedAttention(), OpCounter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    stats = counter.counts(images=1).stats
    assert out.shape == q.shape and out.dtype == torch.float16
    assert [(s.op, s.dtype) for s in stats] == [("aten._scaled_dot_product_flash_attention_for_cpu.default",
                                                 "float16")]
    assert stats[0].flops == 4 * 2 * 8 * 4096 * 4096 * 40  # Q K^T and P V: 4 B H S^2 D
    assert stats[0].bytes_read == 3 * q.numel() * 2  # q, k, v; no S x S score matrix is written


# --- counting whole pipelines -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd21_counts():
    return {steps: count_arch("sd21", steps=steps) for steps in (2, 4)}


def test_count_arch_record_has_the_measured_schema_and_is_marked_counted(sd21_counts):
    r = sd21_counts[2]
    assert Record.from_json({"schema": 2, **r}).to_json() == {"schema": 2, **r}  # a valid record, read back whole
    assert r["status"] == "counted" and r["meter"] == "count"
    assert r["energy_j_per_image"] is None and r["duration_s_per_image"] is None  # nothing was measured
    for key in ("flops_per_image", "bytes_per_image", "flops_per_image_by_dtype", "proxy_j_per_image_by_module",
                "proxy_j_per_image_by_part", "uncounted_ops"):
        assert key in r
    assert (r["arch"], r["steps"], r["resolution"], r["guidance"], r["batch_size"], r["dtype"]) == (
        "sd21", 2, 768, 7.5, 1, "fp16")
    phases = r["phases"]
    # Guidance 7.5 > 1: the prompt and the empty negative prompt through the text encoder, then one
    # denoiser call per DDIM step carrying both halves (batch 2), then one VAE decode.
    assert {k: v["calls"] for k, v in phases.items()} == {"text_encoder": 2, "denoise_step": 2, "vae_decode": 1,
                                                           "other": 1}
    assert sum(p["flops"] for p in phases.values()) == r["flops_per_image"]
    assert [c["phase"] for c in r["phase_calls"]] == ["text_encoder"] * 2 + ["denoise_step"] * 2 + ["vae_decode"]
    assert r["parameters"] == {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}
    # fp16 end to end: all but a few scheduler and embedding FLOPs are half precision.
    assert r["flops_per_image_by_dtype"]["float16"] / r["flops_per_image"] > 0.999999
    assert any(m.startswith("unet.up_blocks") for m in r["proxy_j_per_image_by_module"])
    json.dumps(r)  # JSON-serialisable as a results.jsonl line


def test_steps_scale_the_denoiser_part_linearly_and_nothing_else(sd21_counts):
    two, four = sd21_counts[2]["phases"], sd21_counts[4]["phases"]
    assert four["denoise_step"]["flops"] == 2 * two["denoise_step"]["flops"]
    assert four["denoise_step"]["bytes"] == 2 * two["denoise_step"]["bytes"]
    for phase in ("text_encoder", "vae_decode"):
        assert four[phase]["flops"] == two[phase]["flops"]


def test_kernels_by_phase_add_up_to_the_counted_work(sd21_counts):
    r = sd21_counts[2]
    k = r["kernels"]
    # Rows [phase, class, dtype, launches, FLOPs per launch, bytes per launch] of the whole batch (1 image).
    for phase, p in r["phases"].items():
        rows = [x for x in k if x[0] == phase]
        # Per-launch sizes are means rounded to whole FLOPs and bytes: equal to a part in 10^6.
        assert sum(x[3] * x[4] for x in rows) == pytest.approx(p["flops"], rel=1e-6)
        assert sum(x[3] * x[5] for x in rows) == pytest.approx(p["bytes"], rel=1e-6)

    def launches(rec, phase):
        return sum(x[3] for x in rec["kernels"] if x[0] == phase)

    # Twice the steps, twice the denoiser launches; the text encoder and the VAE launch the same.
    assert launches(sd21_counts[4], "denoise_step") == 2 * launches(r, "denoise_step") > 0
    assert launches(sd21_counts[4], "vae_decode") == launches(r, "vae_decode") > 0
    assert {x[1] for x in k} == {"conv", "matmul", "attention", "norm", "elementwise"}


def test_guidance_one_runs_a_single_half_and_encodes_no_negative_prompt(sd21_counts):
    one = count_arch("sd21", steps=2, guidance=1.0)["phases"]
    cfg = sd21_counts[2]["phases"]
    assert one["text_encoder"]["calls"] == 1
    assert one["denoise_step"]["flops"] == pytest.approx(cfg["denoise_step"]["flops"] / 2, rel=1e-9)


@pytest.mark.slow  # about 15 s on one loaded core: every call of the reference run is dispatched on meta
def test_replayed_denoiser_calls_count_what_running_them_counts():
    backbone = ArchBackbone("sd21", resolution=256)
    request = GenerationRequest(("a cat",), batch_size=1)
    replayed = make_generator("sd:steps=3", backbone)
    run = make_generator("sd:steps=3", backbone)
    run.memoize = False  # every call really runs under the counter
    a, _ = count_phase_occurrences(replayed, request, root=replayed.parts)
    b, _ = count_phase_occurrences(run, request, root=run.parts)
    assert replayed.memo_hits == 2 and run.memo_hits == 0
    assert (a.flops(), a.bytes_moved(), a.flops_by_dtype()) == (b.flops(), b.bytes_moved(), b.flops_by_dtype())


def test_deepcache_applies_as_on_pipelines():
    plain = count_arch("sd21", steps=6, resolution=256)
    cached = count_arch("sd21", "sd+cached", steps=6, resolution=256)
    calls = [c["flops"] for c in cached["phase_calls"] if c["phase"] == "denoise_step"]
    full = [c["flops"] for c in plain["phase_calls"] if c["phase"] == "denoise_step"][0]
    # interval 3: calls 0 and 3 run the whole UNet, the others only its shallow branch.
    assert calls[0] == calls[3] == full
    assert calls[1] == calls[2] == calls[4] == calls[5] < full / 2
    assert cached["flops_per_image"] < plain["flops_per_image"]


def test_dtype_options_and_the_fp16_technique():
    r = count_arch("sd15", "sd-fp16", steps=1, dtype="fp32", resolution=256)
    by = r["flops_per_image_by_dtype"]
    unet = r["phases"]["denoise_step"]["flops"]
    assert by["float16"] == pytest.approx(unet, rel=1e-6)  # the technique casts the denoiser only
    assert by["float32"] == pytest.approx(r["flops_per_image"] - unet, rel=1e-3)  # text encoder and VAE stay fp32


@pytest.mark.slow  # two SD 1.5 counts on meta: about 12 s on one loaded core
def test_int8_on_meta_stays_weightless_and_counts_the_linears_as_int8():
    plain = count_arch("sd15", "sd", steps=1, resolution=256)["flops_per_image_by_dtype"]
    r = count_arch("sd15", "sd+int8", steps=1, resolution=256)
    by = r["flops_per_image_by_dtype"]
    # torchao's W8A8 linears (counted as the torch._int_mm they run on a CPU) take exactly the float16
    # FLOPs of SD 1.5's linears; its convolutions stay float16. Measured: a third of the UNet step.
    assert plain["float16"] - by["float16"] == by["int8"]
    assert 0.25 < by["int8"] / r["phases"]["denoise_step"]["flops"] < 0.45


@pytest.mark.parametrize("model, needs", [("sd+contextual", "activations of real weights"),
                                          ("un0", "trained gates"),
                                          ("sd-distilled", "trained student"),
                                          ("sd+pruned-unstructured", "ranks weights by magnitude"),
                                          ("sd+pruned", "fine-tuned pruned weights")])
def test_techniques_that_need_weights_are_refused_with_the_reason(model, needs):
    with pytest.raises(StackError, match=needs) as e:
        count_arch("sd15", model)
    assert "no weights" in str(e.value)


def test_bad_arch_and_options_are_refused():
    with pytest.raises(UserError, match="Did you mean 'sdxl'"):
        count_arch("sdx")
    with pytest.raises(UserError, match="multiple of 8"):
        count_arch("sd15", resolution=500)
    with pytest.raises(UserError, match="both set the steps"):
        count_arch("sd15", "sd:steps=3", steps=4)
    with pytest.raises(StackError, match="un0-osc"):
        count_arch("un0-cifar10-1024", "sd")
    with pytest.raises(UserError, match="unguided"):
        count_arch("adm-imagenet64", guidance=4.0)


def test_compare_refuses_an_arch_backbone_with_the_reason(tmp_path, capsys):
    from un0_bench.cli import main

    assert main(["compare", "--backbone", "arch:sd15", "--models", "sd", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "meta device" in err and "un0-bench count --arch sd15" in err


def test_cli_count_prints_phases_and_appends_a_counted_record(tmp_path, capsys):
    from un0_bench.cli import main

    out = tmp_path / "c"
    assert main(["count", "--arch", "un0-cifar10-1024", "--steps", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "oscillate" in text and "published FID@50k: 11.01" in text
    lines = (out / "results.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert rec["status"] == "counted" and rec["steps"] == 3 and rec["model"] == "un0-osc:steps=3"


# --- parameter counts against the published ones -------------------------------------------------


def test_every_shipped_arch_names_its_source():
    assert {"sd15", "sd21", "sdxl", "sdxl-turbo", "adm-imagenet64", "un0-imagenet64-16384"} <= set(ARCH_NAMES)
    for name in ARCH_NAMES:
        cfg = arch_config(name)
        assert cfg["source"], name
        assert {"steps", "resolution", "guidance"} <= set(cfg["defaults"]), name


def test_sdxl_and_turbo_are_one_network_at_two_settings():
    base, turbo = arch_config("sdxl"), arch_config("sdxl-turbo")
    assert base["denoiser"]["config"] | {"sample_size": 64} == turbo["denoiser"]["config"]
    assert (turbo["defaults"]["steps"], turbo["defaults"]["resolution"], turbo["defaults"]["guidance"]) == (1, 512, 0.0)
    unet = build_on_meta("UNet2DConditionModel", base["denoiser"]["config"])
    n = sum(p.numel() for p in unet.parameters())
    assert n == 2_567_463_684
    assert n == pytest.approx(base["published_parameters"]["unet"], rel=0.02)  # "2.6B" in the SDXL paper
    enc = [build_on_meta(e["class"], e["config"]) for e in base["text_encoders"]]
    total = sum(p.numel() for m in enc for p in m.parameters())
    assert total == pytest.approx(base["published_parameters"]["text_encoders"], rel=0.01)  # "817M"


def test_pixart_sigma_is_a_transformer_denoiser_with_a_t5_encoder():
    cfg = arch_config("pixart-sigma")
    dit = build_on_meta(cfg["denoiser"]["class"], cfg["denoiser"]["config"])
    assert sum(p.numel() for p in dit.parameters()) == pytest.approx(cfg["published_parameters"]["transformer"],
                                                                     rel=0.02)  # "0.6B"
    assert cfg["text_encoders"][0]["class"] == "T5EncoderModel" and cfg["defaults"]["steps"] == 20
    with pytest.raises(StackError, match="UNet2DConditionModel"):
        count_arch("pixart-sigma", "sd+cached")  # DeepCache caches UNet features; a DiT has none


def test_adm_matches_its_published_size_and_settings():
    cfg = arch_config("adm-imagenet64")
    unet = build_on_meta("UNet2DModel", cfg["denoiser"]["config"])
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(296e6, rel=0.01)
    assert cfg["defaults"]["steps"] == 250 and cfg["published_fid50k"]["value"] == 2.07


PUBLISHED_UN0 = {"un0-cifar10-1024": 1.29e6, "un0-cifar10-2048": 4.94e6, "un0-cifar10-4096": 19.43e6,
                 "un0-imagenet64-6656": 57.17e6, "un0-imagenet64-10240": 129.80e6,
                 "un0-imagenet64-16384": 322.44e6}


@pytest.mark.parametrize("arch", sorted(PUBLISHED_UN0))
def test_un0_published_sizes_through_the_un0_osc_code_path(arch):
    from un0_bench.un0_impl.oscillator import OscillatorNet
    from un0_bench.un0_impl.published import published_config, published_net

    backbone = ArchBackbone(arch)
    net = published_net(published_config(backbone))
    assert isinstance(net, OscillatorNet)
    parts = {name: sum(p.numel() for p in getattr(net, name).parameters()) for name in ("encoder", "dynamics",
                                                                                          "decoder")}
    total = sum(parts.values())
    # NB: the split between conditioning and decoder is assumed (see un0.json); the total is within 1%.
    assert total == pytest.approx(PUBLISHED_UN0[arch], rel=0.01)
    assert parts["decoder"] / total < 0.13  # "a small convolutional decoder, under 13% of the parameters"
    assert arch_config(arch)["published_parameters"]["total"] == PUBLISHED_UN0[arch]


def test_un0_16384_counts_its_euler_steps_exactly():
    r = count_arch("un0-imagenet64-16384", steps=10)
    assert r["parameters_total"] == pytest.approx(322.44e6, rel=0.005)
    assert r["published_fid50k"]["value"] == 6.74
    n, m, rank, b = 16384, 16384, 32, 1
    # Per Euler step per image: K (N x N) times (cos, sin) = 4 N^2, plus 6 N pointwise (see
    # KuramotoDynamics.step); once per image: the class drive, (2B x M)(M x r) and (2B x r)(r x N)
    # matmuls plus cos and sin of the M conditioning phases.
    drive = 2 * (2 * b) * m * rank + 2 * (2 * b) * rank * n + 2 * b * m
    assert r["phases"]["oscillate"]["flops"] == 10 * (4 * n * n + 6 * n) + drive
    assert r["phases"]["decode"]["flops"] > r["phases"]["oscillate"]["flops"]  # the digital decoder dominates


def test_digits_oscillator_config_is_unchanged():
    from un0_bench.un0_impl.oscillator import OscillatorConfig, OscillatorNet

    net = OscillatorNet(OscillatorConfig())
    keys = [k for k in net.state_dict() if k.startswith("decoder.")]
    assert keys == ["decoder.net.0.weight", "decoder.net.0.bias", "decoder.net.2.weight", "decoder.net.2.bias",
                    "decoder.net.4.weight", "decoder.net.4.bias"]
    assert net(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2]), 2).shape == (2, 1, 16, 16)


@pytest.mark.slow
def test_sdxl_counts_two_encoders_once_each_and_decodes_in_float32():
    r = count_arch("sdxl", steps=2)
    phases = r["phases"]
    # force_zeros_for_empty_prompt: the negative prompt is zeros, so each encoder runs once.
    assert phases["text_encoder"]["calls"] == phases["text_encoder_2"]["calls"] == 1
    assert r["flops_per_image_by_dtype"]["float32"] == pytest.approx(phases["vae_decode"]["flops"], rel=1e-3)


def test_batch_size_keeps_flops_per_image_and_shares_weight_reads():
    one = count_arch("un0-imagenet64-16384", batch_size=1)
    four = count_arch("un0-imagenet64-16384", batch_size=4)
    assert four["images"] == 4 and four["flops_per_image"] == pytest.approx(one["flops_per_image"], rel=1e-12)
    # Weights are read once per batch: K (16384^2 float32 = 1.07 GB) at each of the 10 Euler steps, the
    # other parameters (decoder, conditioning: total - K) once. Per image a batch of 4 saves 3/4 of that
    # (within 1%: activations that are not weights change with the batch too).
    k_bytes = 16384 * 16384 * 4
    other_bytes = (one["parameters_total"] - 16384 * 16384) * 4
    saved = one["bytes_per_image"] - four["bytes_per_image"]
    assert saved == pytest.approx((10 * k_bytes + other_bytes) * 3 / 4, rel=0.01)
