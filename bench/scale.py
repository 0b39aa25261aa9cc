"""The sweep engine's own overhead per cell: hundreds of trivial cells, local and on a local Ray cluster.

    .venv/bin/python bench/scale.py --cells 200 --cpus 2

A trivial cell (a generator that returns zeros after one tiny matmul, the ``wall`` meter, one
window) costs almost nothing to measure, so what a cell takes here is the engine: building the
workbench, the counting pass, scheduling, moving the result back, the driver's quality and record
bookkeeping and the fsynced append. Printed figures:

- local seconds per cell (the engine in one process);
- Ray seconds per cell of wall time with ``--cpus`` slots, and the overhead per cell and slot
  (slots x wall per cell - local per cell): what each cell adds on a cluster;
- the driver's CPU seconds per cell: the driver handles at most 1 / that cells a second, which is
  where it becomes the limit of a grid.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from un0_bench.harness.core.backbone import Backbone
from un0_bench.harness.core.generator import GenerationRequest, GenerationResult, Generator
from un0_bench.harness.registry import Registry
from un0_bench.harness.running.runner import RunConfig, Runner


class Trivial(Generator):
    """Zeros after one (B, 4) @ (4, 4) matmul: FLOPs > 0, time ~ 0."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        x = torch.zeros(len(request.prompts), 4) @ torch.eye(4)  # (B, 4)
        return GenerationResult(images=x.reshape(-1, 1, 2, 2), prompts=request.prompts)

    def describe(self) -> dict[str, Any]:
        return {"technique": "trivial"}


class Flat(Backbone):
    kind = "flat"

    def __init__(self, arg: str | None = None) -> None:
        self.name = "flat"

    def check_prompt(self, prompt: str) -> None:
        pass

    def default_prompts(self, n: int) -> list[str]:
        return [f"p{i}" for i in range(n)]

    def describe(self) -> dict[str, Any]:
        return {"backbone": "flat"}


def registries(cells: int) -> dict[str, Registry]:
    gens = Registry("generator")
    for i in range(cells):
        gens.register(f"c{i}", lambda backbone: Trivial())
    meters = Registry("meter")
    meters.register("wall", "un0_bench.harness.meters.wall:WallMeter")
    backbones = Registry("backbone")
    backbones.register("flat", Flat)
    return {"generators": gens, "meters": meters, "backbones": backbones}


def config(out: Path, cells: int) -> RunConfig:
    return RunConfig.of(models=[f"c{i}" for i in range(cells)], out=out, backbone="flat", meters=["wall"], images=2,
                        batch_sizes=[2], min_repeats=1, max_repeats=1, min_duration_s=0.0, warmup=0, idle_s=0.0,
                        quality_samples=0, reference="c0")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (its parallel slots)")
    args = p.parse_args(argv)
    from un0_bench.harness.executors.ray import RayExecutor

    n = args.cells
    with tempfile.TemporaryDirectory(prefix="un0-scale-") as tmp:
        t0 = time.perf_counter()
        Runner(config(Path(tmp) / "local", n), **registries(n)).run()
        local_s = (time.perf_counter() - t0) / n

        executor = RayExecutor(num_cpus=args.cpus)
        t0 = time.perf_counter()
        ray = executor.connect()  # starts the local cluster
        start_s = time.perf_counter() - t0
        try:
            # A first small sweep starts the worker processes, so the figure below is the steady state.
            Runner(config(Path(tmp) / "warm", args.cpus), **registries(args.cpus), executor=executor).run()
            runner = Runner(config(Path(tmp) / "ray", n), **registries(n), executor=executor)
            t0, c0 = time.perf_counter(), _cpu_s()
            runner.run()
            ray_s, driver_cpu_s = (time.perf_counter() - t0) / n, (_cpu_s() - c0) / n
        finally:
            executor.shutdown()

    overhead_s = args.cpus * ray_s - local_s
    print(f"cells: {n} trivial cells (wall meter, one window), host of {os.cpu_count()} CPUs, Ray {ray.__version__}")
    print(f"local executor:   {local_s * 1e3:8.1f} ms per cell")
    print(f"ray, {args.cpus} slots:     {ray_s * 1e3:8.1f} ms of wall time per cell (cluster start {start_s:.1f} s, "
          f"not included)")
    print(f"ray overhead:     {overhead_s * 1e3:8.1f} ms per cell and slot ({args.cpus} x wall per cell - local)")
    print(f"driver CPU:       {driver_cpu_s * 1e3:8.1f} ms per cell -> the driver handles at most "
          f"{1 / driver_cpu_s:.0f} cells/s" if driver_cpu_s > 0 else "driver CPU: below the clock's resolution")
    return 0


if __name__ == "__main__":
    sys.exit(main())
