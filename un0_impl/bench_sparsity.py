"""How much of the FLOP reduction of gated sparsity turns into wall-clock speed on this machine.

``python -m un0_impl.bench_sparsity --json OUT.json`` times the gated MLP blocks of ``un0`` alone
(shapes of :data:`un0_bench.un0_impl.gated.UN0_CONFIG`), dense (every hidden unit) versus the compact gathered
sub-network at keep 0.1, 0.01 and 0.001, for one prompt group of ``batch`` images:

* ``flop_reduction``: dense FLOPs / sparse FLOPs, both counted by :class:`OpCounter`;
* ``speedup``: dense time / sparse time (median over repeats, same batch, same shapes);
* ``realisation``: speedup / flop_reduction (1.0: every FLOP saved is time saved).

The gather itself is not timed: it happens once per prompt and is cached (see ``un0`` cold vs warm
figures in the benchmark records). This is a benchmark printing figures, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.un0_impl.gated import UN0_CONFIG
from un0_bench.un0_impl.sparse import GatedMLP, kept_units

KEEPS = (0.1, 0.01, 0.001)
#: Images per prompt group. Larger groups amortise the fixed per-op dispatch cost.
BATCHES = (64, 256, 1024)
#: Targets from the issue: realisation at keep 0.1 and at keep 0.01.
TARGETS = {0.1: 0.5, 0.01: 0.25}


def _time_per_call_s(fn: Callable[[], Any], min_s: float) -> float:
    """Seconds per call of ``fn``, calling it in a loop until ``min_s`` has passed (after one warm-up)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return elapsed / n


def _flops(fn: Callable[[], Any], images: int) -> int:
    with OpCounter() as c:
        fn()
    return c.counts(images=images).flops()


@torch.no_grad()
def measure(keep: float, batch: int, dim: int, hidden: int, blocks: int, repeats: int, min_s: float,
            seed: int = 0) -> dict[str, Any]:
    """One row: dense versus compact at ``keep`` for a group of ``batch`` images.

    Dense and sparse windows alternate, so both see the same load from other processes; the
    figures are medians over ``repeats`` windows of at least ``min_s`` each.
    """
    torch.manual_seed(seed)
    mlp = GatedMLP(dim, hidden, blocks).requires_grad_(False)
    k = kept_units(keep, hidden)
    index = torch.stack([torch.randperm(hidden)[:k].sort().values for _ in range(blocks)])  # (blocks, k)
    compact = mlp.gather(index)
    h = torch.randn(batch, dim)  # (B, dim)

    def dense() -> torch.Tensor:
        return mlp.forward_masked(h)

    def sparse() -> torch.Tensor:
        return compact(h)

    dense_flops, sparse_flops = _flops(dense, batch), _flops(sparse, batch)
    dense_s, sparse_s = [], []
    for _ in range(repeats):
        dense_s.append(_time_per_call_s(dense, min_s))
        sparse_s.append(_time_per_call_s(sparse, min_s))
    d, s = statistics.median(dense_s), statistics.median(sparse_s)
    reduction = dense_flops / sparse_flops
    speedup = d / s
    return {
        "keep": keep, "batch": batch, "dim": dim, "hidden": hidden, "blocks": blocks, "kept": k,
        "dense_flops": dense_flops, "sparse_flops": sparse_flops, "flop_reduction": reduction,
        "dense_s": d, "sparse_s": s, "speedup": speedup, "realisation": speedup / reduction,
        "dense_s_all": dense_s, "sparse_s_all": sparse_s, "repeats": repeats, "min_window_s": min_s,
        "threads": torch.get_num_threads(), "target_realisation": TARGETS.get(keep),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m un0_impl.bench_sparsity", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the rows (a JSON list)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="images per prompt group")
    p.add_argument("--repeats", type=int, default=15, help="timed windows per variant (median reported)")
    p.add_argument("--min-window-s", type=float, default=0.05, help="minimum length of one timed window")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); on a host shared with other jobs, 1 "
                        "avoids OpenMP threads waiting on each other, which swamps small kernels")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    dim, hidden, blocks = UN0_CONFIG["dim"], UN0_CONFIG["hidden"], UN0_CONFIG["blocks"]
    rows = [measure(keep, b, dim, hidden, blocks, args.repeats, args.min_window_s)
            for b in args.batches for keep in KEEPS]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"gated MLP: {blocks} blocks, dim {dim}, hidden {hidden}; torch threads {torch.get_num_threads()}")
    print(f"{'batch':>6} {'keep':>6} {'kept':>5} {'FLOP red.':>10} {'dense us':>10} {'sparse us':>10} "
          f"{'speedup':>8} {'realis.':>8} {'target':>7}")
    for r in rows:
        target = f">={r['target_realisation']:g}" if r["target_realisation"] else "-"
        print(f"{r['batch']:>6} {r['keep']:>6g} {r['kept']:>5} {r['flop_reduction']:>10.1f} "
              f"{r['dense_s'] * 1e6:>10.1f} {r['sparse_s'] * 1e6:>10.1f} {r['speedup']:>8.1f} "
              f"{r['realisation']:>8.2f} {target:>7}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
