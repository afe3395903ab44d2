"""Which method at which step count: FD and recall of distilled students against NFE, one row per method, from
the ``metrics.json`` files that ``fastgen eval`` wrote -- a Markdown table and a plot.

    python scripts/which_method.py --out docs/which_method_fmnist \
        --row "SiD:1=runs/sid/eval2000:4=runs/sid4/eval2000" \
        --row "LCM:1=sweep/lcm_s1:2=sweep/lcm_s2:4=sweep/lcm_s4:8=sweep/lcm_s8" \
        --reference "best solver (bench):1=39.2/0.057/1000:2=13.3/0.360/1000"

Each ``--row`` is ``LABEL:NFE=FOLDER[:NFE=FOLDER...]`` (a folder with ``metrics.json``, or the file itself);
``--reference`` rows (e.g. the teacher's best training-free solver per NFE, from a ``fastgen bench`` table) are
drawn dashed, and their cells may also be ``NFE=FD/RECALL/IMAGES`` copied from that table. The table gives
``FD / recall`` per NFE and the number of images behind each cell where rows differ in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2, nothing written."""
    print(f"which_method.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_row(spec: str, literal: bool = False) -> tuple[str, dict[int, dict]]:
    """``LABEL:NFE=PATH:...`` -> ``(label, {nfe: metrics})`` (``literal``: cells may be ``FD/RECALL/IMAGES``);
    :func:`fail` on a bad spec."""
    label, *cells = spec.split(":")
    if not label or not cells:
        fail(f"{spec!r}: expected LABEL:NFE=FOLDER[:NFE=FOLDER...]")
    points = {}
    for cell in cells:
        nfe, _, path = cell.partition("=")
        values = path.split("/")
        if not nfe.isdigit() or int(nfe) < 1:
            fail(f"{label!r}: {cell!r} does not start with a positive NFE (NFE=FOLDER)")
        if literal and len(values) == 3 and all(v.replace(".", "", 1).isdigit() for v in values):
            points[int(nfe)] = {"fd": float(values[0]), "recall": float(values[1]), "num_images": int(values[2])}
            continue
        file = Path(path) / "metrics.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            fail(f"{label!r}: {path!r} is not a folder with a metrics.json (NFE=FOLDER"
                 + (" or NFE=FD/RECALL/IMAGES)" if literal else ")"))
        data = json.loads(file.read_text())
        points[int(nfe)] = {**data.get("metrics", data), "num_images": data.get("num_images")}
    return label, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", action="append", default=[], help="LABEL:NFE=FOLDER[:NFE=FOLDER...] (a student)")
    parser.add_argument("--reference", action="append", default=[], help="as --row, drawn dashed (e.g. solvers)")
    parser.add_argument("--out", required=True, help="output prefix: OUT.md and OUT.png")
    args = parser.parse_args()
    rows = [(*parse_row(r, literal=True), False) for r in args.reference] + [(*parse_row(r), True) for r in args.row]
    nfes = sorted({n for _, points, _ in rows for n in points})
    plotted = sorted({n for _, points, student in rows for n in points if student or len(points) > 1})

    lines = ["| method | " + " | ".join(f"NFE {n}: FD / recall" for n in nfes) + " |",
             "|---|" + "---:|" * len(nfes)]
    for label, points, _ in rows:
        cells = [f"{points[n]['fd']:.2f} / {points[n]['recall']:.3f} ({points[n]['num_images']})" if n in points
                 else "-" for n in nfes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n\n(images per cell in brackets)\n")

    fig, (ax_fd, ax_recall) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points, student in rows:
        xs = sorted(points)
        if not student and len(xs) == 1:  # one reference point (the teacher's many-step solve): a level line
            ax_fd.axhline(points[xs[0]]["fd"], linestyle=":", color="black", label=label)
            ax_recall.axhline(points[xs[0]]["recall"], linestyle=":", color="black", label=label)
            continue
        style = dict(marker="o") if student else dict(linestyle="--", color="grey")
        ax_fd.plot(xs, [points[n]["fd"] for n in xs], label=label, **style)
        ax_recall.plot(xs, [points[n]["recall"] for n in xs], label=label, **style)
    for ax, name in ((ax_fd, "FD (lower is better)"), (ax_recall, "recall (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(plotted, [str(n) for n in plotted])
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_fd.set_yscale("log")
    ax_recall.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print("\n".join(lines))
    print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
    main()
