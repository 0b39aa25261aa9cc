"""``un0-bench count``: count a real architecture's work on the meta device (no weights, no download)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from un0_bench.commands.options import work_options
from un0_bench.harness.running.config import finite, models_list, path_arg


def add_parser(sub: Any) -> None:
    c = sub.add_parser("count", help="count the work of a real architecture on the meta device (no weights, no "
                                     "download): FLOPs and bytes per image, per phase and per module")
    c.add_argument("--arch", required=True, type=models_list,
                   help="architecture(s), comma-separated (see `un0-bench list`: sd15, sd21, sdxl, sdxl-turbo, "
                        "adm-imagenet64, un0-imagenet64-16384, ...)")
    c.add_argument("--models", type=models_list, default=None,
                   help="stacks to count, as in compare (sd, sd+cached, sd-int8, sd-fp16); default: the arch's own "
                        "model (sd; un0-osc for un0-*)")
    work_options(c, guidance=finite)
    c.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="dtype of every component (default: the arch's; fp16 for the SD family)")
    c.add_argument("--out", type=path_arg, default=None,
                   help="folder for results.jsonl (default: runs/count-<UTC time>); records are appended")


def cmd_count(args: argparse.Namespace) -> int:
    """Count each arch x model once and append the counted records (``status: counted``) to results.jsonl."""
    from un0_bench.backbones.archs import count_arch, default_model
    from un0_bench.harness.running.results import ResultStore, check_writable
    from un0_bench.reports.counts import format_counted

    out = args.out or Path("runs") / time.strftime("count-%Y%m%d-%H%M%S", time.gmtime())
    check_writable(out)
    store = ResultStore(out)
    for arch in args.arch:
        for model in args.models or [default_model(arch)]:
            record = count_arch(arch, model, steps=args.steps, resolution=args.resolution, batch_size=args.batch_size,
                                guidance=args.guidance, dtype=args.dtype)
            store.append([record])
            print(format_counted(record))
    print(f"counted records (work, not measurements) appended to {store.path}")
    return 0
