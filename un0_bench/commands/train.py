"""``un0-bench train TARGET|all``: reproduce a shipped weights file from its seed."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import path_arg, positive_int


def add_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="reproduce a shipped weights file from its seed")
    t.add_argument("target", help="what to train (see `un0-bench list`), or all")
    t.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the shipped run's)")
    t.add_argument("--batch-size", type=positive_int, default=None,
                   help="training batch size, for the targets that take one (default: the shipped run's)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--out", type=path_arg, default=None,
                   help="weights file (default: the shipped location; sd-distilled writes <stem>-4 and <stem>-1 "
                        "beside it)")


def cmd_train(args: argparse.Namespace) -> int:
    from un0_bench.harness.registry import TRAINERS

    if args.target == "all":
        targets = TRAINERS.names_in_order()
        if args.out is not None:
            raise UserError("--out names one file; it cannot be used with 'train all'")
    else:
        TRAINERS.entry(args.target)  # "did you mean" for an unknown target
        targets = [args.target]
    if args.out is not None:
        from un0_bench.harness.running.results import check_file_writable

        check_file_writable(args.out, "weights file")  # before training, not minutes after
    trainers = {name: TRAINERS.get(name) for name in targets}
    if args.batch_size is not None:
        fixed = [n for n, train in trainers.items() if "batch_size" not in inspect.signature(train).parameters]
        if fixed:
            raise UserError(f"--batch-size does not apply to {', '.join(fixed)} (a batch size fixed by the recipe)")
    options = (("steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed), ("out", args.out))
    for name, train in trainers.items():
        meta = train(**{k: v for k, v in options if v is not None})
        energy = ", ".join(f"{m}={v.get('energy_j')}" for m, v in meta["energy"].items() if "status" in v)
        print(f"{name}: trained in {meta['duration_s']:.0f} s; energy (J): {energy}")
    return 0
