"""un0_bench.measure and un0_bench.window: a user's callable measured under the CLI's protocol."""

from __future__ import annotations

import json

import pytest
import torch
from un0_bench.harness.errors import UserError
from un0_bench.harness.registry import Registry
from un0_bench.harness.running.results import ResultStore

import un0_bench
from tests.conftest import SequenceMeter

FAST = {"min_repeats": 2, "min_duration_s": 0.0, "warmup": 1, "idle_s": 0.0}
WEIGHT = torch.eye(16)


def matmul_images() -> torch.Tensor:
    """4 images a call. FLOPs per call: one (4, 16) @ (16, 16) matmul = 2 * 4 * 16 * 16 = 2048, and a division of
    64 elements = 64; 2112 a call, 528 an image."""
    with un0_bench.window("denoise"):
        z = torch.ones(4, 16) @ WEIGHT
    with un0_bench.window("decode"):
        return z.reshape(4, 1, 4, 4) / 2


def test_readme_example_counts_phases_and_writes_records(tmp_path):
    # The README's example, shortened only in its protocol options.
    result = un0_bench.measure(matmul_images, images_per_call=4, out=tmp_path / "run", meters="proxy,wall", **FAST)
    assert result.flops_per_image == 528.0
    assert result.status == {"proxy": "ok", "wall": "ok"}
    assert result.energy_j_per_image["wall"] is None  # wall measures time only
    assert result.energy_j_per_image["proxy"] > 0
    assert set(result.phase_energy_j) == {"denoise", "decode"}
    # The matmul ran inside "denoise": all of its FLOPs are that phase's; "decode" only divides (64 a call).
    record = next(r for r in result.records if r["meter"] == "proxy")
    assert record["phases"]["denoise"]["flops"] == 2048
    assert record["phases"]["decode"]["flops"] == 64
    stored = ResultStore(tmp_path / "run").load()
    assert {(r["model"], r["backbone"], r["meter"]) for r in stored} == {("mine", "callable", "proxy"),
                                                                         ("mine", "callable", "wall")}
    from un0_bench.cli import main

    assert main(["report", str(tmp_path / "run")]) == 0
    assert "mine" in (tmp_path / "run" / "summary.md").read_text()


def test_whole_device_meter_gives_exact_joules_per_window_and_phase(tmp_path):
    # Every start/stop pair of the fake meter reads +3 J: two windows of 4 images -> 0.75 J an image,
    # then one window per phase occurrence (denoise, decode) -> 3 J each.
    energies = [v for k in range(4) for v in (10.0 * k, 10.0 * k + 3.0)]
    times = [v for k in range(4) for v in (float(k), k + 0.5)]
    meters = Registry("meter")
    meters.register("seq", lambda: SequenceMeter(energies, times))
    result = un0_bench.measure(matmul_images, images_per_call=4, out=tmp_path, meters="seq",
                               meter_registry=meters, **FAST)
    assert result.energy_j_per_image == {"seq": 0.75}
    assert result.phase_energy_j == {"denoise": {"seq": 3.0}, "decode": {"seq": 3.0}}


def test_window_outside_a_measurement_does_nothing():
    assert matmul_images().shape == (4, 1, 4, 4)


@pytest.mark.parametrize(("fn", "ipc", "message"), [
    (lambda: 1 / 0, 1, "mine raised ZeroDivisionError: division by zero"),
    (lambda: None, 1, "mine returned nothing (None)"),
    (lambda: torch.zeros(3, 1, 4, 4), 4, "mine returned a tensor of shape (3, 1, 4, 4); expected (4, C, H, W)"),
    (lambda: torch.zeros(1, 1, 4, 4), 0, "images_per_call must be a positive integer, got 0"),
])
def test_bad_input_is_one_line_and_writes_no_record(tmp_path, fn, ipc, message):
    with pytest.raises(UserError) as e:
        un0_bench.measure(fn, images_per_call=ipc, out=tmp_path / "run", meters="proxy", **FAST)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_a_list_of_integer_images_is_read_as_0_to_255(tmp_path):
    result = un0_bench.measure(lambda: [torch.full((4, 4), 255, dtype=torch.uint8)] * 2, images_per_call=2,
                               out=tmp_path, meters="proxy", **FAST)
    record = result.records[0]
    assert record["images"] == 2 and json.dumps(record["config"]["generator"]["images_per_call"]) == "2"
