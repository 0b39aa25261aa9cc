import hashlib
import json

import torch
import un0_bench.backbones.teacher as teacher_module
from un0_bench.backbones.ddim import SCHEDULER_CONFIG, ddim_step, make_scheduler
from un0_bench.backbones.digits import DigitsBackbone
from un0_bench.baselines.distilled import SAMPLERS, StudentSampler, student_config, unpack_int8
from un0_bench.harness.core.generator import GenerationRequest
from un0_bench.harness.core.stack import make_generator
from un0_bench.harness.weights.checkpoints import load_checkpoint
from un0_bench.training import distilled
from un0_bench.training.distilled import distill_loss, distill_student, rollout_inputs, train_distilled

from tests.baselines.test_diffusion import tiny_unet
from tests.baselines.test_distilled import TINY_JSON, tiny_pairs


def test_rollout_inputs_are_step_major():
    sampler = StudentSampler((999, 499), ("epsilon", "epsilon"))
    noise, labels, _ = tiny_pairs(4)
    x, t = rollout_inputs(tiny_unet(), sampler, make_scheduler().alphas_cumprod, noise, labels)
    assert x.shape == (8, 1, 16, 16) and t.tolist() == [999] * 4 + [499] * 4
    assert torch.equal(x[:4], noise)  # step 0 sees the noise itself
    assert not torch.equal(x[4:], noise)


def test_distillation_reduces_the_loss():
    # Learnable targets: each digit's "teacher image" is a flat grey level, so the map is a function
    # of the label that a tiny UNet can fit in a few iterations (random images could only be memorised).
    noise, labels, _ = tiny_pairs(16)
    pairs = noise, labels, (labels.float() / 4.5 - 1).view(-1, 1, 1, 1).expand(-1, 1, 16, 16)
    _, _, losses = distill_student(tiny_unet(), pairs, StudentSampler((999, 499), ("sample", "sample")),
                                   iterations=20, batch=8, lr=3e-3, ema_decay=0.9, seed=0)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_noise_target_makes_the_ddim_x0_the_teacher_image():
    # An output with zero loss at a noise-predicting step is one whose DDIM x0 is the target image.
    sampler = StudentSampler((700,), ("epsilon",))
    alphas = make_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g) * 2 - 1

    class Exact(torch.nn.Module):  # outputs the noise that leads from x to target
        def forward(self, x, t, class_labels=None):
            a = alphas[t].view(-1, 1, 1, 1)
            return type("Out", (), {"sample": (x - a.sqrt() * target) / (1 - a).sqrt()})

    t = torch.full((2,), 700)
    assert float(distill_loss(Exact(), sampler, alphas, x, t, torch.tensor([1, 2]), target)) < 1e-10
    out = Exact()(x, t).sample
    _, x0 = ddim_step(alphas, x, out, 700, None, "epsilon")
    torch.testing.assert_close(x0, target, atol=1e-5, rtol=0)


def test_train_writes_both_students_that_build_loads(tmp_path, monkeypatch):
    # The whole trainer on a tiny teacher and 20 pairs, 2 iterations per student; only the wall
    # meter (codecarbon takes seconds to start).
    monkeypatch.setattr("un0_bench.harness.weights.derivation._TRAINING_METERS", ("wall",))
    teacher_meta = {"config": TINY_JSON, "energy": {"wall": {"status": "ok", "energy_j": None, "duration_s": 1.0}}}
    monkeypatch.setattr(teacher_module, "UNET_CONFIG", TINY_JSON)
    monkeypatch.setattr(teacher_module, "build_unet", tiny_unet)
    monkeypatch.setattr(teacher_module, "load_teacher", lambda path=None: (tiny_unet().eval(), teacher_meta))
    monkeypatch.setattr(distilled, "teacher_pairs", lambda n, steps=50: tiny_pairs())
    fake_teacher_file = tmp_path / "teacher.safetensors"
    fake_teacher_file.write_bytes(b"stands in for the teacher's weights")
    monkeypatch.setattr(teacher_module, "TEACHER_FILE", fake_teacher_file)
    meta = train_distilled(steps=2, seed=1, out=tmp_path / "sd-distilled.safetensors")
    assert meta["student_steps"] == 4
    for k in (4, 1):
        saved = json.loads((tmp_path / f"sd-distilled-{k}.json").read_text())
        assert saved["config"] == student_config(k, TINY_JSON, SCHEDULER_CONFIG)
        assert saved["train"]["iterations"] == 2 and saved["train"]["seed"] == 1
        assert saved["teacher_sha256"] == hashlib.sha256(b"stands in for the teacher's weights").hexdigest()
        energy = saved["energy"]
        assert energy["proxy"]["flops"] > 0
        assert energy["includes"]["teacher"] == teacher_meta["energy"]
        pairs = energy["includes"]["teacher_pairs"]["proxy"]
        assert pairs["energy_j"] > 0 and "x 50 steps x 16 batches" in pairs["note"]  # 4,096 pairs = 16 x 256
        assert saved["storage"].startswith("int8")
        packed, _ = load_checkpoint(tmp_path / f"sd-distilled-{k}.safetensors")
        assert packed["conv_in.weight"].dtype == torch.int8 and packed["conv_in.bias"].dtype == torch.float32
        gen = make_generator(f"sd-distilled:steps={k}", DigitsBackbone(weights_dir=tmp_path))
        assert gen.model.steps == k and gen.derivation()["student_steps"] == k
        assert gen.model.sampler["schedule"] == (SAMPLERS[k].timesteps, SAMPLERS[k].predictions)
        # The student's weights are the saved EMA weights, unpacked.
        for name, w in unpack_int8(packed).items():
            assert torch.equal(gen.model.denoiser.state_dict()[name], w), name
        out = gen.generate(GenerationRequest(("4", "5"), seed=0, batch_size=2)).images
        assert out.shape == (2, 1, 16, 16)
