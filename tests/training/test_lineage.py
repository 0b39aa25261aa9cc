"""What each shipped weights file derives from, and what deriving it cost: the metadata the ledger charges.

The catalog's training table names each target's parents; a derived file's metadata must include the
derivation energy of exactly those parents (the ledger's "amortised training" boundary adds them), and a
student that learns from the teacher's pairs must include their cost, recorded by the one estimator
(``training.pairs.teacher_pairs_energy``).
"""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path

import pytest
from un0_bench.backbones.digits import WEIGHTS_DIR
from un0_bench.harness.registry import TRAINERS
from un0_bench.training import distilled, oscillator, un0
from un0_bench.training.pairs import teacher_pairs_energy

from tests.training.test_reproduce import FILES
from un0_bench.catalog import TRAINING
from un0_bench.cli import build_parser

#: The students that learn the teacher's noise -> image map, and how many pairs each learns from.
PAIRS = {"sd-distilled": distilled.PAIRS, "un0": un0.TRAIN_DEFAULTS["pairs"],
         "un0-osc": oscillator.TRAIN_DEFAULTS["pairs"]}


def _shipped(name: str) -> dict:
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def test_training_order_puts_every_parent_first():
    order = TRAINERS.names_in_order()
    assert order == list(TRAINING) and set(order) == set(FILES)
    for target, (_, parents, _) in TRAINING.items():
        assert all(order.index(p) < order.index(target) for p in parents), target


@pytest.mark.parametrize("target", list(FILES))
def test_each_shipped_file_includes_what_it_derives_from(target):
    for name in FILES[target]:
        includes = set(_shipped(name)["energy"].get("includes", {}))
        assert includes == set(TRAINING[target][1]) | ({"teacher_pairs"} if target in PAIRS else set()), name


@pytest.mark.parametrize("target", list(FILES))
def test_each_shipped_command_is_one_un0_bench_train_accepts(target):
    # The command in a file's metadata is how a user reproduces it: it must parse, name its target and
    # pass only options the target's trainer takes (teacher.json's ``--batch-size 128`` once did not parse).
    for name in FILES[target]:
        argv = shlex.split(_shipped(name)["command"])
        args = build_parser().parse_args(argv[1:])
        assert (argv[0], args.command, args.target) == ("un0-bench", "train", target), name
        options = {k for k in ("steps", "batch_size", "seed") if getattr(args, k) is not None}
        assert options <= set(inspect.signature(TRAINERS.get(target)).parameters), name


@pytest.mark.parametrize("target", list(PAIRS))
def test_the_shipped_teacher_pairs_cost_is_the_one_estimators(target):
    # Counted, so deterministic: one DDIM step of a 256-image batch through the teacher x 50 steps x n / 256.
    made = teacher_pairs_energy(PAIRS[target])["energy"]["proxy"]
    # The same work seen another way: a pair is one 50-step DDIM image of the teacher, which is what the
    # gate counts for `sd` through the generator (bench/baseline.json), per image, to within the few
    # batch-size-dependent sampler ops (1e-6).
    sd = json.loads((Path(__file__).parents[2] / "bench" / "baseline.json").read_text())["models"]["sd"]
    assert made["flops"] / PAIRS[target] == pytest.approx(sd["flops_per_image"], rel=1e-6)
    for name in FILES[target]:
        shipped = _shipped(name)["energy"]["includes"]["teacher_pairs"]["proxy"]
        assert (shipped["flops"], shipped["energy_j"], shipped["note"]) == \
            (made["flops"], made["energy_j"], made["note"]), name


def test_teacher_pairs_cost_scales_with_n_and_refuses_a_partial_batch():
    one, four = (teacher_pairs_energy(n, steps=s, batch=4)["energy"] for n, s in ((4, 2), (16, 4)))
    # Four batches of twice the steps: 8x the counted step, so exactly 8x the FLOPs and proxy joules.
    assert four["proxy"]["flops"] == 8 * one["proxy"]["flops"] > 0
    assert four["proxy"]["energy_j"] == pytest.approx(8 * one["proxy"]["energy_j"], rel=1e-12)
    assert four["wall"]["energy_j"] is None and four["wall"]["duration_s"] > 0
    with pytest.raises(ValueError, match="multiple of batch"):
        teacher_pairs_energy(10, steps=2, batch=4)
