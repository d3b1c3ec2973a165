"""Loss curves of a run: every log line to ``loss_curves.csv`` as it happens, a seaborn plot at the end.

The csv is appended to (a resumed run continues it; rows at or before the resume step are skipped so the file never
holds a step twice) and holds the per-modality losses the trainer logs, so the curves survive a crash and can be
re-plotted with ``python -m uni_arch.train.curves plot outputs/<run>/loss_curves.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from loguru import logger
from transformers import TrainerCallback

CURVE_COLUMNS = ("step", "epoch", "loss", "text_loss", "image_loss", "learning_rate", "grad_norm", "real_tokens",
                 "tokens_per_second", "token_utilisation", "text_tokens", "image_tokens")
CSV_NAME, PNG_NAME = "loss_curves.csv", "loss_curves.png"


def _last_step(path: Path) -> int:
    if not path.is_file():
        return -1
    with open(path, newline="") as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]
    return max(steps, default=-1)


class LossCurveCallback(TrainerCallback):
    """Append each training log (on the main process) to ``output_dir/loss_curves.csv``; plot at train end."""

    def __init__(self, output_dir: str | Path, plot: bool = True):
        self.path = Path(output_dir) / CSV_NAME
        self.plot = plot
        self._written_up_to: int | None = None  # last step in the csv; read once, then tracked (it only grows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        if self._written_up_to is None:
            self._written_up_to = _last_step(self.path)
        if state.global_step <= self._written_up_to:
            return  # already written by the run we resumed from
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({"step": state.global_step, **logs})
        self._written_up_to = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot and state.is_world_process_zero and self.path.is_file():
            out = plot_loss_curves(self.path)
            logger.info(f"loss curves: {self.path} and {out}")


def read_curves(path: str | Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_loss_curves(csv_path: str | Path, out_path: str | Path | None = None,
                     baselines: dict[str, float] | None = None) -> Path:
    """Plot total, text and image loss against the step (seaborn); ``baselines`` ({label: loss}) become dashed
    horizontal lines (e.g. the unigram entropies of ``uni_arch/train/unigram.py``). Returns the png path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = read_curves(csv_path)
    long = [{"step": r["step"], "loss": r[k], "curve": k} for r in rows for k in ("loss", "text_loss", "image_loss") if k in r]
    out = Path(out_path) if out_path else Path(csv_path).with_name(PNG_NAME)
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4))
    if long:
        sns.lineplot(data={k: [d[k] for d in long] for k in ("step", "loss", "curve")}, x="step", y="loss",
                     hue="curve", ax=ax)
    for (label, value), colour in zip((baselines or {}).items(), ("tab:orange", "tab:green", "tab:gray")):
        ax.axhline(value, linestyle="--", linewidth=1, color=colour, label=label)
    if baselines:
        ax.legend()
    ax.set_title(f"training loss ({Path(csv_path).parent.name})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import fire

    from uni_arch.log_setup import setup_logging

    setup_logging()
    fire.Fire({"plot": plot_loss_curves})
