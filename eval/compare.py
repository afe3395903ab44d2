"""``fastgen compare``: which method reaches the teacher first -- training runs side by side.

Each training run evaluated during training (``train.eval_every``) leaves ``eval.jsonl`` in its run
folder: one record per evaluation with the step, the training seconds so far (``train_s``: time in
training iterations, without evaluations and checkpoints) and the metrics of
:data:`fastgen.eval.evaluate.TRAINING_METRICS`. This command reads those records from several runs
and writes

* ``compare.md`` -- one row per run: method, steps, the last evaluation's metrics, training minutes,
  and the minutes until FD first came within ``--fd-bar`` times the teacher's FD (when given);
* ``compare.json`` -- the same, with every record;
* ``compare.png`` -- FD, recall and accuracy against training minutes, one line per run.

Runs compared this way should have trained on the same machine at the same time (e.g. two runs at one
thread each on two cores), with the same batch size: their minutes are then comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("fd", "FD (lower is better)", True), ("recall", "recall (higher is better)", False),
          ("acc", "prompt accuracy", False))


def read_run(folder: str | Path) -> dict:
    """``{"name", "method", "batch_size", "records"}`` of a run folder with ``recipe.json`` and ``eval.jsonl``."""
    folder = Path(folder)
    records_file, recipe_file = folder / "eval.jsonl", folder / "recipe.json"
    if not records_file.is_file():
        raise FileNotFoundError(f"{folder} has no eval.jsonl: train it with --set train.eval_every=N to compare it.")
    records = [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]
    if not records or not all("train_s" in r for r in records):
        raise ValueError(f"{records_file} has no records with training time (train_s); it was written by an older "
                         "fastgen: train the run again.")
    recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    steps = {}
    for r in records:  # a resumed run repeats the evaluations after its checkpoint: keep the last of each step
        steps[r["step"]] = r
    return {"name": folder.name, "method": recipe.get("method", "?"),
            "batch_size": recipe.get("train", {}).get("batch_size"), "records": sorted(steps.values(),
                                                                                      key=lambda r: r["step"])}


def minutes_to(records: list[dict], key: str, bar: float) -> float | None:
    """Training minutes until ``records[i][key] <= bar`` first holds (``None``: never)."""
    hit = next((r for r in records if r.get(key) is not None and r[key] <= bar), None)
    return None if hit is None else hit["train_s"] / 60


def compare_runs(folders: list[str | Path], out: str | Path, teacher_fd: float | None = None,
                 fd_bar: float = 1.25, labels: list[str] | None = None) -> dict:
    """Read the runs, write ``compare.md``, ``compare.json`` and ``compare.png`` to ``out``; returns the result.

    Args:
        folders: run folders (each with ``eval.jsonl``).
        out: output folder.
        teacher_fd: the teacher's FD at the same number of images, for the "minutes to the bar" column.
        fd_bar: the bar as a multiple of ``teacher_fd``.
        labels: names of the runs in the table and plot (default: the folder names).
    """
    if not folders:
        raise ValueError("fastgen compare needs at least one run folder.")
    if labels is not None and len(labels) != len(folders):
        raise ValueError(f"--labels: {len(labels)} labels for {len(folders)} runs.")
    if teacher_fd is not None and not teacher_fd > 0:
        raise ValueError(f"--teacher-fd must be > 0, got {teacher_fd}.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder.")
    runs = [read_run(f) for f in folders]
    for run, label in zip(runs, labels or [r["name"] for r in runs]):
        run["label"] = label
        if teacher_fd is not None:
            run["minutes_to_bar"] = minutes_to(run["records"], "fd", fd_bar * teacher_fd)
    result = {"teacher_fd": teacher_fd, "fd_bar": fd_bar, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(compare_markdown(result))
    plot_runs(result, out / "compare.png")
    return result


def compare_markdown(result: dict) -> str:
    from .evaluate import fmt

    bar = result["teacher_fd"] is not None
    head = ["run", "method", "batch", "steps", "train min", "FD", "per-class FD", "precision", "recall", "coverage",
            "accuracy"] + ([f"min to FD <= {result['fd_bar']}x teacher"] if bar else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for run in result["runs"]:
        last = run["records"][-1]
        acc = last.get("acc")
        row = [run["label"], run["method"], str(run["batch_size"]), str(last["step"]), f"{last['train_s'] / 60:.1f}",
               fmt(last.get("fd"), 2), fmt(last.get("fd_class"), 2), fmt(last.get("precision"), 3),
               fmt(last.get("recall"), 3), fmt(last.get("coverage"), 3), "-" if acc is None else f"{acc * 100:.1f}%"]
        if bar:
            row.append("never" if run["minutes_to_bar"] is None else f"{run['minutes_to_bar']:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(p[0] in r for run in result["runs"] for r in run["records"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels):
        for run in result["runs"]:
            pts = [(r["train_s"] / 60, r[key]) for r in run["records"] if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=run["label"])
        if key == "fd" and result["teacher_fd"] is not None:
            ax.axhline(result["teacher_fd"], color="grey", ls="--", lw=1, label="teacher")
            ax.axhline(result["teacher_fd"] * result["fd_bar"], color="grey", ls=":", lw=1,
                       label=f"{result['fd_bar']}x teacher")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("training minutes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["compare_runs", "read_run", "minutes_to", "compare_markdown", "plot_runs"]
