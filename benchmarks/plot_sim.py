"""Bar chart of the simulated-fleet benchmark: adaptive and static as a fraction of the oracle.

``python benchmarks/plot_sim.py [--from-json FILE] [--out docs/images/sim_vs_oracle.svg]``

Without ``--from-json`` it runs ``python -m adaptive_nb.bench benchmarks/scenarios/*.json
--json`` itself. The SVG is written by hand (matplotlib is not a dependency) so the chart is
self-contained and reproducible from the benchmark's JSON alone. Static bars that ended
early (first out-of-memory or lost device) are hatched: their rate covers only the time
static ran, so they are not comparable to a full run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
# Goal classes of the simulator-v2 issue; tests/test_plot_sim.py checks this equals
# tests/test_bench.py's FLOOR, so the chart cannot drift from the goals the tests hold.
GOALS = {
    "homogeneous_idle": 0.96, "mixed_generations": 0.96, "job_lands": 0.96,
    "memory_squeeze": 0.96, "device_failure": 0.96, "single_gpu": 0.96,
    "eight_gpu_mixed": 0.96, "twelve_gpu_greedy": 0.96,
    "curves_mixed_generations": 0.95, "time_sliced_cotenant": 0.95,
    "bandwidth_cotenant": 0.95, "forward_fraction_mix": 0.95, "sixteen_gpu": 0.95,
    "flapping": 0.85, "memory_bursts_lag": 0.85, "everything_eight_gpu": 0.85,
}  # fmt: skip
COLOURS = {"adaptive": "#1f6fb4", "static": "#e08a1e", "oracle": "#333", "goal": "#c0392b"}
LEFT, TOP, PLOT_H, GROUP_W, BAR_W, BOTTOM, RIGHT = 70, 70, 320, 58, 20, 135, 90


def load_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON records of ``bench --json`` (its human-readable lines are skipped)."""
    return [json.loads(line) for line in lines if line.lstrip().startswith("{")]


def _bar(x: float, frac: float, y_of: Any, colour: str, cls: str, hatched: bool) -> str:
    y, h = y_of(frac), y_of(0.0) - y_of(frac)
    fill = "url(#hatch)" if hatched else colour
    return (
        f'<rect class="{cls}" x="{x:.1f}" y="{y:.1f}" width="{BAR_W}" height="{h:.1f}" '
        f'fill="{fill}" stroke="{colour}"><title>{frac:.3f} of oracle</title></rect>'
    )


def render_svg(records: list[dict[str, Any]], goals: Mapping[str, float] = GOALS) -> str:
    """One group per scenario: adaptive and static samples/s divided by the oracle's."""
    rows = []
    for r in records:
        o = r["oracle"]["samples_per_s"]
        rows.append((r["scenario"], r["adaptive"]["samples_per_s"] / o,
                     r["static"]["samples_per_s"] / o, bool(r["static"]["failed"])))  # fmt: skip
    top = max([1.2] + [max(a, s) for _, a, s, _ in rows])
    top = int(top * 10 + 0.999) / 10
    width = LEFT + GROUP_W * len(rows) + RIGHT + 150
    height = TOP + PLOT_H + BOTTOM

    def y_of(frac: float) -> float:
        return TOP + PLOT_H * (1 - frac / top)

    plot_r = LEFT + GROUP_W * len(rows)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
        f'<rect width="3" height="6" fill="{COLOURS["static"]}"/></pattern></defs>',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{width / 2:.0f}" y="28" text-anchor="middle" font-size="16" '
        'font-weight="bold">Simulated fleets: throughput as a fraction of the oracle</text>',
        f'<text x="{width / 2:.0f}" y="48" text-anchor="middle" fill="#555">virtual time, '
        "no GPU, no model compute (python -m adaptive_nb.bench)</text>",
    ]
    for i in range(round(top * 10) + 1):  # y grid every 0.1
        f = i / 10
        y = y_of(f)
        out.append(f'<line x1="{LEFT}" x2="{plot_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{f:.1f}</text>')
    out.append(f'<text transform="translate(20 {TOP + PLOT_H / 2}) rotate(-90)" '
               'text-anchor="middle">samples/s ÷ oracle samples/s</text>')  # fmt: skip
    for i, (name, a, s, failed) in enumerate(rows):
        gx = LEFT + GROUP_W * i
        x0 = gx + (GROUP_W - 2 * BAR_W) / 2
        out.append(_bar(x0, a, y_of, COLOURS["adaptive"], "bar adaptive", False))
        out.append(_bar(x0 + BAR_W, s, y_of, COLOURS["static"], "bar static", failed))
        if failed:
            out.append(f'<text x="{x0 + 1.5 * BAR_W:.1f}" y="{y_of(s) - 4:.1f}" font-size="10" '
                       'text-anchor="middle">failed</text>')  # fmt: skip
        if name in goals:
            gy = y_of(goals[name])
            out.append(f'<line class="goal" x1="{x0 - 4:.1f}" x2="{x0 + 2 * BAR_W + 4:.1f}" '
                       f'y1="{gy:.1f}" y2="{gy:.1f}" stroke="{COLOURS["goal"]}" stroke-width="2" '
                       'stroke-dasharray="4 2"/>')  # fmt: skip
        lx, ly = gx + GROUP_W / 2, TOP + PLOT_H + 12
        out.append(f'<text x="{lx:.1f}" y="{ly}" text-anchor="end" '
                   f'transform="rotate(-40 {lx:.1f} {ly})">{escape(name)}</text>')  # fmt: skip
    y1 = y_of(1.0)
    out.append(f'<line x1="{LEFT}" x2="{plot_r}" y1="{y1:.1f}" y2="{y1:.1f}" '
               f'stroke="{COLOURS["oracle"]}" stroke-width="1.5"/>')  # fmt: skip
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{y_of(0):.1f}" stroke="#333"/>')
    out.append(f'<line x1="{LEFT}" x2="{plot_r}" y1="{y_of(0):.1f}" y2="{y_of(0):.1f}" '
               'stroke="#333"/>')  # fmt: skip
    out.append(f'<text x="{(LEFT + plot_r) / 2:.0f}" y="{height - 8}" text-anchor="middle">'
               "scenario (benchmarks/scenarios/*.json)</text>")  # fmt: skip
    lx, legend = plot_r + 15, [
        ("adaptive", f'<rect width="14" height="14" fill="{COLOURS["adaptive"]}"/>'),
        ("static (equal split)", f'<rect width="14" height="14" fill="{COLOURS["static"]}"/>'),
        ("static, failed (rate until then)", f'<rect width="14" height="14" fill="url(#hatch)" '
                                f'stroke="{COLOURS["static"]}"/>'),
        ("oracle = 1.0", f'<line x2="14" y1="7" y2="7" stroke="{COLOURS["oracle"]}" '
                         'stroke-width="1.5"/>'),
        ("goal for scenario", f'<line x2="14" y1="7" y2="7" stroke="{COLOURS["goal"]}" '
                              'stroke-width="2" stroke-dasharray="4 2"/>'),
    ]  # fmt: skip
    for k, (label, mark) in enumerate(legend):
        ty = TOP + 22 * k
        out.append(f'<g transform="translate({lx} {ty})">{mark}'
                   f'<text x="20" y="11">{escape(label)}</text></g>')  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--from-json", type=Path, help="output of `bench --json` (else: run it)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "sim_vs_oracle.svg")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        lines = args.from_json.read_text().splitlines()
    else:
        scenarios = sorted(str(p) for p in (ROOT / "benchmarks" / "scenarios").glob("*.json"))
        cmd = [sys.executable, "-m", "adaptive_nb.bench", *scenarios, "--json"]
        proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        lines = proc.stdout.splitlines()
    records = load_records(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_svg(records))
    print(f"wrote {args.out} ({len(records)} scenarios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
