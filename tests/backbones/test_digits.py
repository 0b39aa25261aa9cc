import pytest
import torch

from un0_bench.backbones.digits import DigitsBackbone, load_data, prompt_label
from un0_bench.harness.errors import PromptError


@pytest.mark.parametrize("prompt, label", [("7", 7), ("digit 7", 7), ("a handwritten seven", 7),
                                           ("  Digit   0 ", 0), ("the number 3", 3), ("nine", 9)])
def test_accepted_prompt_forms(prompt, label):
    assert prompt_label(prompt) == label


@pytest.mark.parametrize("prompt", ["", "10", "digit seventy", "a cat", "7 and 8", "digit -1"])
def test_other_prompts_are_refused_with_the_accepted_forms(prompt):
    with pytest.raises(PromptError, match=r'accepted prompts: "7", "digit 7", "a handwritten seven"'):
        prompt_label(prompt)


def test_data_split_shapes_range_and_balance():
    d = load_data()
    assert d.train_images.shape == (1437, 1, 16, 16) and d.test_images.shape == (360, 1, 16, 16)
    assert float(d.train_images.min()) >= -1.0 and float(d.train_images.max()) <= 1.0
    # Stratified: each digit has 35 or 36 held-out images (1,797 images, 20% held out).
    counts = torch.bincount(d.test_labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    assert len(d.sha256) == 64


def test_default_prompts_cycle_over_digits():
    prompts = DigitsBackbone().default_prompts(23)
    assert [prompt_label(p) for p in prompts] == [i % 10 for i in range(23)]
