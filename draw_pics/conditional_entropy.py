"""The reference's Figure 2: n-gram conditional entropy H_n against n, one line per stream of ``tools/cal_entropy.py``.

    python draw_pics/conditional_entropy.py --entropy_json outputs/entropy/entropy.json
    python draw_pics/conditional_entropy.py --entropy_json outputs/entropy/entropy.json --out fig2.pdf --reference False

Streams from ``entropy.json`` are solid lines; a point flagged ``unreliable`` (too few n-grams per distinct n-gram)
gets a hollow marker. With ``reference`` (the default) the reference paper's published numbers are overlaid as
dashed lines: they come from other data (8,192 Chameleon codes over 1M images; English Wikipedia in Qwen2.5
tokens), so read them as the shape to compare with, not as a target. Reads files only (imports nothing of the
toolkit); seaborn on matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import json
from pathlib import Path

# The reference's published H_n (bits) for n = 1..4 (its Figure 2; the only numbers it gives for n = 4).
REFERENCE_BITS: dict[str, tuple[float, ...]] = {
    "reference: image codes (8,192 codes, 1M images)": (11.06, 10.29, 7.39, 4.97),
    "reference: English (Qwen2.5 tokens)": (10.83, 6.96, 4.11, 1.84),
}


def entropy_frame(entropy_json: str | Path, reference: bool = True):
    """A long table (source, n, entropy_bits, unreliable, measured) of the tool's streams, plus the reference's."""
    import pandas as pd

    path = Path(entropy_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no entropy results (run python tools/cal_entropy.py first)")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        rows = [{"source": stream["name"], "n": row["n"], "entropy_bits": row["entropy_bits"],
                 "unreliable": bool(row["unreliable"]), "measured": True}
                for stream in result["streams"] for row in stream["rows"] if row["entropy_bits"] is not None]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an entropy.json of tools/cal_entropy.py ({type(e).__name__}: {e})") from e
    if reference:
        rows += [{"source": name, "n": n, "entropy_bits": bits, "unreliable": False, "measured": False}
                 for name, values in REFERENCE_BITS.items() for n, bits in enumerate(values, start=1)]
    return pd.DataFrame(rows, columns=["source", "n", "entropy_bits", "unreliable", "measured"])


def draw(entropy_json: str | Path, out: str | Path | None = None, reference: bool = True) -> Path:
    """Write the plot to ``out`` (default: ``conditional_entropy.png`` beside the json; ``.pdf``/``.svg`` work too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = entropy_frame(entropy_json, reference)
    out = Path(out) if out else Path(entropy_json).with_name("conditional_entropy.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    sns.set_style("whitegrid")
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    measured, published = frame[frame["measured"]], frame[~frame["measured"]]
    if not measured.empty:
        sns.lineplot(data=measured, x="n", y="entropy_bits", hue="source", marker="o", ax=ax, palette="tab10")
        shaky = measured[measured["unreliable"]]
        if not shaky.empty:
            ax.scatter(shaky["n"], shaky["entropy_bits"], s=80, facecolors="white", edgecolors="black", zorder=3,
                       label="unreliable (sparse n-grams)")
    if not published.empty:
        sns.lineplot(data=published, x="n", y="entropy_bits", hue="source", style="source", dashes=[(4, 2)] * 2,
                     marker="s", palette=["crimson", "cornflowerblue"], ax=ax, alpha=0.6)
    ax.set_xlabel("n-gram (n)")
    ax.set_ylabel("conditional entropy H_n (bits)")
    ax.set_xticks(sorted(frame["n"].unique()))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, title=None)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=150, format=out.suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(draw, serialize=str)
