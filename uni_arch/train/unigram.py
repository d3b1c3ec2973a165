"""The loss a model must beat: the entropy of the unigram distribution of the training targets, per modality.

A model that ignored its context and predicted each modality's token frequencies would reach exactly these
cross-entropies (in nats, like the training loss), so a run that has learned anything sits clearly below them.
The targets are counted on the very rows the run trains on (same arguments, same rendering and packing; the
first token of each document is not a target, as in the collator).

    python -m uni_arch.train.unigram --config configs/train/stage2.yaml [same arguments as hf_trainer.py]

(The trainer writes it at the end of a map-style run from the rows it trained on; ``train.sh`` runs this module
only for a streaming run, with the run's own arguments.) Writes ``output_dir/unigram_baseline.json`` and,
when ``output_dir/loss_curves.csv`` exists, logs the run's final text and image losses next to the baselines and
redraws ``loss_curves.png`` with the baselines as dashed lines. Image targets are ``CodeVocab.is_image_target``
(size tags, codes, ``<|vision_end|>``), exactly the trainer's ``image_loss``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterable

from loguru import logger

from modeling.vocab import CodeVocab


def unigram_entropy(counts: Counter) -> float:
    """Entropy (nats) of the empirical distribution ``counts``."""
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else float("nan")


def count_targets(rows: Iterable[dict], vocab: CodeVocab) -> dict[str, Counter]:
    """Target-token counts per modality (image = ``CodeVocab.is_image_target``, as in the trainer)."""
    from modeling.vocab import IGNORE_INDEX
    from uni_arch.train.data_collator import packed_row_labels
    from uni_arch.train.trainer import target_is_image

    counts = {"text": Counter(), "image": Counter()}
    for row in rows:
        labels = packed_row_labels(row)
        labels = labels[labels != IGNORE_INDEX]
        image = target_is_image(labels, vocab)
        counts["image"].update(labels[image].tolist())
        counts["text"].update(labels[~image].tolist())
    return counts


def final_losses(curves_csv: Path, last: int = 5) -> dict[str, float]:
    """Mean of the last ``last`` logged values of each loss (one log is noisy)."""
    from uni_arch.train.curves import read_curves

    rows = read_curves(curves_csv)
    out = {}
    for key in ("loss", "text_loss", "image_loss"):
        values = [r[key] for r in rows if key in r][-last:]
        if values:
            out[key] = sum(values) / len(values)
    return out


def report(rows: Iterable[dict], vocab: CodeVocab, out_dir: Path) -> dict:
    """Count the targets of ``rows``, write ``out_dir/unigram_baseline.json``, redraw the loss curves with the
    baselines and log them beside the run's final losses. The trainer calls this with the rows it has just trained
    on (no second rendering of the corpus); :func:`main` renders them again for a run made elsewhere."""
    counts = count_targets(rows, vocab)
    result = {f"{m}_unigram_entropy": unigram_entropy(c) for m, c in counts.items()}
    result.update({f"{m}_targets": sum(c.values()) for m, c in counts.items()})
    curves = out_dir / "loss_curves.csv"
    if curves.is_file():
        from uni_arch.train.curves import plot_loss_curves

        result["final"] = final_losses(curves)
        plot_loss_curves(curves, baselines={f"{m} unigram": result[f"{m}_unigram_entropy"] for m in ("text", "image")})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "unigram_baseline.json").write_text(json.dumps(result, indent=2))
    lines = [f"{'':8s}{'unigram H':>12s}{'final loss':>12s}"]
    for m in ("text", "image"):
        final = result.get("final", {}).get(f"{m}_loss", float("nan"))
        lines.append(f"{m:8s}{result[f'{m}_unigram_entropy']:12.4f}{final:12.4f}")
    logger.info("unigram baseline (nats/token) vs the run's final losses (mean of the last 5 logs):\n" + "\n".join(lines))
    return result


def main(argv: list[str] | None = None) -> dict:
    from uni_arch.log_setup import setup_logging
    from uni_arch.train import builders
    from uni_arch.train.args import parse_args

    model_args, data_args, training_args = parse_args(argv)
    setup_logging(0)
    data_args.streaming_data = 0  # count over the materialised rows
    _, vocab, dataset = builders.build_data(model_args, data_args, training_args)
    return report(dataset.rows, vocab, Path(training_args.output_dir))


if __name__ == "__main__":
    main()
