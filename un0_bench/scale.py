"""``make bench-scale``: the Un-0 claim at real scale, projected (minutes on a CPU, no weights, offline).

For the published Un-0 sizes and the ImageNet-64 diffusion model (ADM): counted FLOPs per image
(meta device, ``un0_bench.backbones.archs.count_arch``), projected J per image on a GPU (H100 by default),
published FID@50k, the factor Un-0 vs diffusion at each size (digital), and the analog break-even:
the energy per oscillator-step a substrate must reach, decoder kept digital, for 1,000x. The same run
projects the published measurements of ``reports/published.csv`` (the validation table) and the
settings the absolute claims of ``reports/claims.csv`` plausibly mean, then builds the report.
Every record is projected, none measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from un0_bench.estimate import PUBLISHED_FILE, CountFn, count, parse_setting, published_rows, write_report
from un0_bench.harness.errors import UserError
from un0_bench.harness.projection.roofline import (
    GpuProfile,
    get_gpu_profile,
    load_calibration,
    project,
    projected_record,
)

#: The published Un-0 sizes (Unconventional AI, June 2026) and the diffusion model of each dataset.
UN0_ARCHS = {
    "cifar10": ["un0-cifar10-1024", "un0-cifar10-2048", "un0-cifar10-4096"],
    "imagenet64": ["un0-imagenet64-6656", "un0-imagenet64-10240", "un0-imagenet64-16384"],
}
DIFFUSION_ARCHS = {"imagenet64": "adm-imagenet64"}
DEFAULT_PROFILE = "h100-sxm5"
#: Images per sampler run in the scale table: a serving batch. At batch 1 an Un-0 step reads its whole
#: N x N coupling matrix for one image and is memory-bound; a batch shares that read.
SCALE_BATCH = 64


def _projected(setting: str, cal: Any, count_fn: CountFn | None, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    arch, kwargs, profile = parse_setting(setting)
    kwargs.setdefault("dtype", "fp16")
    spec = setting.partition("@")[0]
    if spec not in cache:
        cache[spec] = count(arch, count_fn=count_fn, **kwargs)
        cache[spec]["model"] = spec
    return projected_record(cache[spec], get_gpu_profile(profile), cal)


def validation_records(cal: Any, count_fn: CountFn | None = None, path: Path = PUBLISHED_FILE,
                       cache: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One projected record per published point, carrying the point (``published_point``)."""
    cache = {} if cache is None else cache
    out = []
    for row in published_rows(path):
        rec = _projected(row["setting"], cal, count_fn, cache)
        rec["published_point"] = {
            "id": row["point_id"], "role": row["role"], "source": row["source"], "note": row["note"],
            "measured_time_s": float(row["measured_time_s"]) if row["measured_time_s"] else None,
            "measured_energy_j": float(row["measured_energy_j"]) if row["measured_energy_j"] else None,
        }
        out.append(rec)
    return out


def claim_records(cal: Any, count_fn: CountFn | None = None,
                  cache: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One projected record per setting of each absolute claim in ``reports/claims.csv``."""
    from un0_bench.reports.claims import PROJECTED_MEASURES, load_claims

    cache = {} if cache is None else cache
    out = []
    for c in load_claims():
        if c["measure"] not in PROJECTED_MEASURES:
            continue
        for setting in c["models"]:
            rec = _projected(setting, cal, count_fn, cache)
            rec["claim_setting"] = c["claim_id"]
            out.append(rec)
    return out


def _digital_energy_j(rec: dict[str, Any], gpu: GpuProfile, cal: Any) -> float | None:
    """Projected energy per image of every phase but the oscillation (encoder, decoder), kept digital.

    The oscillation phase (its name contains "oscillat") is what an analog substrate would replace.
    """
    phases = rec.get("phases") or {}
    names = [n for n in phases if "oscillat" not in n.lower()]
    if not names or len(names) == len(phases):
        return None
    if rec.get("kernels"):
        return project(rec, gpu, cal, phases=lambda name: "oscillat" not in name.lower())["energy_j_per_image"]
    # A record without kernel rows: the digital phases' totals, charged coarsely.
    images = max(int(rec.get("images") or 1), 1)
    flops = sum(float(phases[n].get("flops") or 0) for n in names) / images
    nbytes = sum(float(phases[n].get("bytes") or 0) for n in names) / images
    total = float(rec["flops_per_image"]) or 1.0
    # NB: the decoder's dtype mix is taken as the whole image's (phases record totals, not dtypes).
    by_dtype = {d: v * flops / total for d, v in rec["flops_per_image_by_dtype"].items()}
    # NB: the digital part gets its own roofline (the phases run one after another).
    sub = {"model": f"{rec['model']} digital part", "flops_per_image": flops, "bytes_per_image": nbytes,
           "flops_per_image_by_dtype": by_dtype}
    return project(sub, gpu, cal)["energy_j_per_image"] if flops or nbytes else 0.0


def _oscillator_steps(rec: dict[str, Any]) -> float | None:
    """Oscillators x integration steps per image.

    NB: the population only: the conditioning pool's phases are learned per class and held fixed (the
    arch config's assumption), so they are read, not integrated.
    """
    if rec.get("oscillator_steps_per_image"):
        return float(rec["oscillator_steps_per_image"])
    for where in (rec, rec.get("config") or {}, (rec.get("config") or {}).get("generator") or {}):
        n, steps = where.get("oscillators"), where.get("steps")
        if n and steps:
            return float(n * steps)
    return None


def scale_records(cal: Any, profile: str = DEFAULT_PROFILE, count_fn: CountFn | None = None,
                  batch_size: int = SCALE_BATCH) -> list[dict[str, Any]]:
    """Un-0 sizes and the diffusion model projected on ``profile``, with what the scale table needs."""
    gpu = get_gpu_profile(profile)
    out = []
    for dataset, archs in UN0_ARCHS.items():
        for arch in archs + ([DIFFUSION_ARCHS[dataset]] if dataset in DIFFUSION_ARCHS else []):
            counted = count(arch, count_fn=count_fn, dtype="fp16", batch_size=batch_size)
            counted["model"] = arch
            rec = projected_record(counted, gpu, cal)
            family = "diffusion" if arch == DIFFUSION_ARCHS.get(dataset) else "un0"
            rec["scale"] = {"family": family, "dataset": dataset,
                            "oscillator_steps_per_image": _oscillator_steps(counted) if family == "un0" else None,
                            "decoder_energy_j_per_image": _digital_energy_j(counted, gpu, cal) if family == "un0"
                            else None}
            out.append(rec)
    return out


def run(out: Path, profile: str = DEFAULT_PROFILE, count_fn: CountFn | None = None,
        report: bool = True, batch_size: int = SCALE_BATCH) -> list[dict[str, Any]]:
    """Project the scale table, the validation points and the claims' settings; write results and report."""
    cal = load_calibration()
    cache: dict[str, dict[str, Any]] = {}
    records = scale_records(cal, profile, count_fn, batch_size) + validation_records(cal, count_fn, cache=cache) \
        + claim_records(cal, count_fn, cache=cache)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in records:
        r["measured_at"] = when  # when it was projected; nothing was measured
    write_report(records, out, report=report)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m un0_bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("reports/scale"))
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"GPU profile (default {DEFAULT_PROFILE})")
    p.add_argument("--batch-size", type=int, default=SCALE_BATCH, help=f"scale table batch (default {SCALE_BATCH})")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if (args.out / "results.jsonl").exists():
            # A projection is recomputed whole each time: the folder holds only this run.
            (args.out / "results.jsonl").replace(args.out / f"results.{time.strftime('%Y%m%d-%H%M%S')}.jsonl.old")
        records = run(args.out, args.profile, batch_size=args.batch_size)
    except UserError as e:
        print(f"un0-bench: error: {e}", file=sys.stderr)
        return 2
    from un0_bench.reports.projected import leave_one_out_lines, scale_rows, validation_rows

    print("PROJECTED, not measured (calibration: " + records[0]["projection"]["calibration"]["name"] + ")")
    print(f"{'model':26} {'FLOPs/image':>12} {'J/image':>10} {'FID@50k':>8} {'factor':>8} "
          f"{'break-even J/osc-step for 1,000x':>34}")
    for r in scale_rows(records)["rows"]:
        be = f"{r['break_even_j']:.3g} ({r['break_even_j'] * 1e15:.3g} fJ)" if r["break_even_j"] else (
            f"unreachable (ceiling {r['ceiling']:.3g}x)" if r["why"] and r["ceiling"] else "—")
        fac = f"{r['factor']:.3g}x" if r["factor"] else "—"
        fid = r["fid"] if r["fid"] is not None else "—"
        print(f"{r['model']:26} {r['flops']:12.4g} {r['energy_j']:10.4g} {fid:>8} {fac:>8} {be:>34}")
    print()
    print("\n".join(leave_one_out_lines(load_calibration().to_dict())))
    print("\nvalidation (projected / measured; calibration rows are fitted, see the leave-one-out above):")
    for v in validation_rows(records):
        print(f"  {v['id']:30} {v['role']:11} {v['quantity']:10} measured {v['measured']:<8.4g} projected "
              f"{v['projected']:<8.4g} ratio {v['ratio']:.3g}")
    print(f"\nreport: {args.out / 'report.html'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
