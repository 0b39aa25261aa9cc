"""Text of a counted record (``un0-bench count``): work per image by phase, dtype and module.

Reads records only; never builds a model. Units are converted here (TFLOP, GB, millions of
parameters) and nowhere else.
"""

from __future__ import annotations

from un0_bench.harness.running.record import Record


def _tflop(flops: float | None) -> str:
    return "? TFLOP" if flops is None else f"{flops / 1e12:.4g} TFLOP"


def _gb(nbytes: float | None) -> str:
    return "? GB" if nbytes is None else f"{nbytes / 1e9:.4g} GB"


def _millions(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.2f}M"


def format_counted(record: Record, top_modules: int = 8) -> str:
    """Lines describing one counted record: settings, totals, phases, dtypes, modules, parameters."""
    r = record
    n = r.get("images") or 1
    guidance = r.get("guidance")
    lines = [
        f"{r['arch']}  {r['model']}  steps {r.get('steps')}, {r.get('resolution')}x{r.get('resolution')}, "
        f"guidance {'none' if guidance is None else f'{guidance:g}'}, {r.get('dtype')}, batch {r.get('batch_size')}"
        f"  (counted in {r.get('count_wall_s', 0.0):.1f} s on this CPU)",
        f"  per image: {_tflop(r['flops_per_image'])}, {_gb(r['bytes_per_image'])} moved   "
        f"[{r.get('status')}: {r.get('label', 'not measured')}]",
        "  by dtype: " + ", ".join(f"{k} {_tflop(v)}" for k, v in sorted(
            (r.get("flops_per_image_by_dtype") or {}).items(), key=lambda kv: -kv[1]) if v > 0),
        f"  {'phase':<16}{'calls':>6}{'TFLOP/image':>14}{'GB/image':>12}{'TFLOP/call':>13}",
    ]
    for name, p in (r.get("phases") or {}).items():
        if name == "other" and not p.get("flops"):
            continue
        calls = p.get("calls") or 0
        per_call = p["flops"] / calls if calls else 0.0
        lines.append(f"  {name:<16}{calls:>6}{p['flops'] / n / 1e12:>14.4g}{p['bytes'] / n / 1e9:>12.4g}"
                     f"{per_call / 1e12:>13.4g}")
    modules = sorted((r.get("flops_per_image_by_module") or {}).items(), key=lambda kv: -kv[1])
    total = r["flops_per_image"] or 1.0
    lines.append(f"  top modules (of {len(modules)}): " + ", ".join(
        f"{m} {v / total:.1%}" for m, v in modules[:top_modules] if v > 0))
    params = r.get("parameters") or {}
    published = r.get("published_parameters") or {}
    shown = []
    for name, count in params.items():
        pub = published.get(name)
        shown.append(f"{name} {_millions(count)}" + (f" (published {_millions(pub)})" if isinstance(pub, (int, float))
                                                     else ""))
    if isinstance(published.get("total"), (int, float)):
        shown.append(f"total {_millions(sum(params.values()))} (published {_millions(published['total'])})")
    lines.append("  parameters: " + ", ".join(shown))
    fid = r.get("published_fid50k")
    if fid:
        lines.append(f"  published FID@50k: {fid.get('value')} ({fid.get('source')})")
    if r.get("uncounted_ops"):
        lines.append("  ops with no FLOP formula: " + ", ".join(f"{k} x{v}" for k, v in r["uncounted_ops"].items()))
    return "\n".join(lines)
