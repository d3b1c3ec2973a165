"""Gradient-conflict plots from ``tools/analyze_model_grad.py``'s ``grad_conflict.csv``: one file or several runs.

    python draw_pics/grad_conflict.py --csv /tmp/grad/grad_conflict.csv --out_dir /tmp/grad/plots
    python draw_pics/grad_conflict.py --csv dense/grad_conflict.csv,uni_x/grad_conflict.csv --labels dense,uni_x \\
        --out_dir /tmp/grad/compare

Both plots show ``conflict = -(cos(g_text, g_mm) - cos(g_A, g_B))`` of the weights text tokens pass through: the
shared weight, or the text branch/expert where the layer has a vision one (the vision branch gets no gradient from
text-only data, so its conflict is N/A by construction; the csv keeps its ``cos_branch``). Positive = text and
multimodal data pull the weight apart more than two random halves of the data do.

    heatmap_<series>.png     layers (rows, labelled with their kind and branch) x weight types (q k v o gate up
                             down), one per run and checkpoint; diverging colours centred on 0; N/A cells blank
    conflict_per_layer.png   the mean over the weight types per layer, one line per run and checkpoint

A series is named ``<label> <checkpoint>`` (the label defaults to the csv's folder name; the part that is the same
for every series is left out). Reads files only (imports nothing of the toolkit); matplotlib's Agg backend.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

WEIGHT_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
TEXT_SIDE = ("shared", "text")  # the branches text tokens pass through


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    """fire passes ``a,b`` as a tuple and ``a`` as a string."""
    if value is None:
        return []
    return [v for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]


def read_conflicts(csv: str | Sequence[str], labels: str | Sequence[str] | None = None):
    """The text-side rows of every csv as one DataFrame with a ``series`` column; ``N/A`` becomes NaN."""
    import pandas as pd

    paths = [Path(p) for p in _as_list(csv)]
    names = _as_list(labels) or [p.parent.name or p.stem for p in paths]
    if not paths:
        raise ValueError("give at least one --csv (tools/analyze_model_grad.py writes grad_conflict.csv)")
    if len(names) != len(paths):
        raise ValueError(f"--labels has {len(names)} entries for {len(paths)} csv files")
    frames = []
    for path, name in zip(paths, names):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such csv (run tools/analyze_model_grad.py first)")
        frame = pd.read_csv(path, na_values=["N/A"], keep_default_na=False)
        missing = {"checkpoint", "layer", "kind", "weight", "branch", "conflict"} - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}: not a grad_conflict.csv")
        frame["label"] = str(name)
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["branch"].isin(TEXT_SIDE)].copy()
    rows["conflict"] = pd.to_numeric(rows["conflict"], errors="raise")
    multi_label = rows["label"].nunique() > 1
    multi_ckpt = rows.groupby("label")["checkpoint"].nunique().max() > 1
    if multi_label and multi_ckpt:
        rows["series"] = rows["label"] + " " + rows["checkpoint"].astype(str)
    else:
        rows["series"] = rows["label"] if multi_label else rows["checkpoint"].astype(str)
    return rows


def _save(fig, path: Path) -> None:
    """Write atomically (a killed run never leaves half a png), then close the figure."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def draw(csv: str | Sequence[str], out_dir: str | Path, labels: str | Sequence[str] | None = None) -> list[str]:
    """Write the heatmaps and the per-layer line plot (module docstring) to ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = read_conflicts(csv, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for series, part in rows.groupby("series", sort=False):
        grid = part.pivot_table(index="layer", columns="weight", values="conflict", aggfunc="first", dropna=False)
        grid = grid.reindex(columns=[w for w in WEIGHT_ORDER if w in grid.columns]).sort_index()
        first = part.drop_duplicates("layer").set_index("layer")
        grid.index = [f"{layer} {first.at[layer, 'kind']}" + (" (text branch)" if first.at[layer, "branch"] == "text"
                                                               else "") for layer in grid.index]
        limit = max(float(part["conflict"].abs().max()), 1e-6) if part["conflict"].notna().any() else 1.0
        fig, ax = plt.subplots(figsize=(1.0 * len(grid.columns) + 2.5, 0.45 * len(grid) + 1.6))
        sns.heatmap(grid, ax=ax, cmap="RdBu_r", center=0.0, vmin=-limit, vmax=limit, annot=len(grid) <= 40,
                    fmt="+.2f", annot_kws={"fontsize": 7}, cbar_kws={"label": "conflict"}, mask=grid.isna())
        ax.set_title(f"gradient conflict: {series}")
        ax.set_xlabel("weight type")
        ax.set_ylabel("layer")
        fig.tight_layout()
        path = out / f"heatmap_{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(series))}.png"
        _save(fig, path)
        written.append(str(path))
    means = rows.groupby(["series", "layer"], sort=False, as_index=False)["conflict"].mean()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    sns.lineplot(data=means, x="layer", y="conflict", hue="series", marker="o", ax=ax)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(sorted(means["layer"].unique()))
    ax.set_ylabel("mean conflict over q k v o gate up down")
    ax.set_title("gradient conflict per layer (> 0: text and multimodal data disagree beyond noise)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    path = out / "conflict_per_layer.png"
    _save(fig, path)
    written.append(str(path))
    return written


if __name__ == "__main__":
    import fire

    fire.Fire(draw)
