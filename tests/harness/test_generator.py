import pytest
import torch
from un0_bench.harness.core.generator import GenerationRequest, image_noise


def test_noise_does_not_depend_on_batching():
    whole = image_noise(7, 0, 6, (1, 4, 4))
    parts = torch.cat([image_noise(7, 0, 2, (1, 4, 4)), image_noise(7, 2, 4, (1, 4, 4))])
    assert torch.equal(whole, parts)
    assert not torch.equal(image_noise(8, 0, 1, (1, 4, 4)), whole[:1])


def test_request_batches():
    r = GenerationRequest(("a", "b", "c", "d", "e"), seed=0, batch_size=2)
    assert r.batches() == [(0, ("a", "b")), (2, ("c", "d")), (4, ("e",))]


@pytest.mark.parametrize("kwargs", [{"prompts": ()}, {"prompts": ("7",), "batch_size": 0},
                                    {"prompts": ("7",), "seed": -1}, {"prompts": (7,)}])
def test_bad_requests_are_refused(kwargs):
    with pytest.raises((ValueError, TypeError)):
        GenerationRequest(**kwargs)
