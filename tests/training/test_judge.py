import torch
from safetensors.torch import load_file
from un0_bench.backbones.digits import load_data
from un0_bench.backbones.judge import held_out_accuracy, load_judge
from un0_bench.training.judge import random_shift, train_judge


def test_random_shift_moves_each_image_by_at_most_one_pixel():
    g = torch.Generator().manual_seed(0)
    x = load_data().train_images[:16]  # (16, 1, 16, 16)
    y = random_shift(x, 1, g)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    shifts = [padded[:, :, dy : dy + 16, dx : dx + 16] for dy in range(3) for dx in range(3)]
    for i in range(16):
        assert any(torch.equal(y[i], s[i]) for s in shifts)
    assert torch.equal(random_shift(x, 0, g), x)


def test_training_is_seeded_and_writes_metadata(tmp_path):
    a = train_judge(steps=3, seed=1, out=tmp_path / "a.safetensors")
    train_judge(steps=3, seed=1, out=tmp_path / "b.safetensors")
    wa, wb = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["command"] == "un0-bench train judge --steps 3 --seed 1"
    assert a["train"]["steps"] == 3 and a["train"]["seed"] == 1
    assert 0.0 <= a["held_out_accuracy"] <= 1.0
    # Proxy: the counted step x 3 steps.
    assert a["energy"]["proxy"]["flops"] > 0 and a["energy"]["proxy"]["flops"] % 3 == 0
    judge, _ = load_judge(tmp_path / "a.safetensors")
    assert held_out_accuracy(judge)[0] == a["held_out_correct"]
