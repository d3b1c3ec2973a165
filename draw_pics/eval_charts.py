"""One bar chart per benchmark from the orchestrator's ``summary.csv`` (``evaluation/eval_template.py``).

    python draw_pics/eval_charts.py --summary outputs/eval/summary.csv --out_dir outputs/eval/charts

Each chart has the benchmark's metrics on the x axis and one bar per experiment (seaborn, matplotlib's Agg backend:
no display needed). Metrics on a 0-1 scale and on a 0-100 scale are not mixed up: the y axis is labelled with the
benchmark's own numbers, as ``results.json`` holds them. Reads files only (imports nothing of the toolkit).
"""

from __future__ import annotations

import csv
from pathlib import Path


def read_summary(path: str | Path) -> list[dict[str, object]]:
    """The rows of ``summary.csv`` (experiment, benchmark, metric, value) with ``value`` as a float."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary (run python evaluation/eval_template.py first)")
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append({**row, "value": float(row["value"])})
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line}: value: not a number ({row.get('value')!r})") from e
    return rows


def draw_charts(summary: str | Path, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/<benchmark>.png`` for every benchmark in ``summary``; returns ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(read_summary(summary))
    if frame.empty:
        return out
    for bench, rows in frame.groupby("benchmark", sort=False):
        metrics = list(dict.fromkeys(rows["metric"]))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(metrics) + 2.0), 3.6))
        sns.barplot(data=rows, x="metric", y="value", hue="experiment", order=metrics, ax=ax)
        ax.set_title(str(bench))
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        for container in ax.containers:
            ax.bar_label(container, fmt="%.3g", fontsize=7)
        fig.tight_layout()
        tmp = out / f".{bench}.png.tmp"
        fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        tmp.replace(out / f"{bench}.png")
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(draw_charts, serialize=str)  # --summary outputs/eval/summary.csv --out_dir outputs/eval/charts
