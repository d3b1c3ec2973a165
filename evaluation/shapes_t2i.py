"""Does a shapes-world checkpoint draw what it is asked? Exact single-object rates measured by the shapes detector.

For every (colour, shape) pair of the shapes world (10 x 4 = 40) the checkpoint draws ``num_seeds`` images of
``"a photo of a red circle"`` (the GenEval ``colors`` phrasing, one of every single-object scene's training
captions) at the default sampling settings of :mod:`evaluation.uni_infer` (CFG, top-k, top-p, temperature), plus
``num_seeds`` images from the unconditional prompt. An image is **exact** for a pair when the detector
(:func:`data_process.shapes.detect.detect`) finds exactly one object and it has that colour and shape: nothing
missing, nothing extra.

Reported (printed, and written to ``<out>/results.json`` with the settings and the checkpoint):

* ``red_circle``: the exact rate of "a photo of a red circle";
* ``uncond_red_circle``: how often the unconditional prompt draws exactly one red circle (a model that ignores its
  prompt and only draws red circles would score high on the first figure too; this is the control);
* ``pair_mean``: the mean exact rate over the 40 pairs, with the per-pair table, and the rates of weaker verdicts
  (right colour, right shape, one object) that say how a miss went wrong;
* with ``--world`` (the shapes world the checkpoint was trained on; train.sh passes its own), ``seen_pair_mean`` and
  ``unseen_pair_mean``: the same means over the pairs the world showed in training and over its held-out pairs
  (``world.json``'s ``unseen_pairs``, the compositional split of ``data_process/shapes_world.py build
  --heldout_pairs K``), which the table marks with ``*``. The drawing gate reads the seen pairs: a pair never
  trained on measures generalisation, not whether training worked;
* ``<out>/red_circle.png`` and ``<out>/pairs.png``: contact sheets to look at.

Seeds: image ``i`` of every prompt uses ``seed + i`` (as ``uni_infer generate``), so any image is reproduced alone::

    python evaluation/shapes_t2i.py --checkpoint outputs/shapes-tiny-uni-x                 # 64 seeds, all pairs
    python evaluation/shapes_t2i.py --checkpoint DIR --num_seeds 16 --out /tmp/quick       # a quick look
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import fire
from loguru import logger
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_process.schema import atomic_write_text  # noqa: E402
from data_process.shapes import COLORS, SHAPES  # noqa: E402
from data_process.shapes.detect import detect  # noqa: E402
from evaluation.benchmarks.shapes import load_world  # noqa: E402
from evaluation.sampling import IMAGE_DEFAULTS, SamplingSettings  # noqa: E402
from evaluation.uni_infer import DEFAULT_CFG_SCALE, UniInfer  # noqa: E402
from tools.conditioning_probe import photo_caption  # noqa: E402

VERDICTS = ("exact", "one_object", "color", "shape")


def verdicts(detections, color: str | None, shape: str | None) -> dict[str, bool]:
    """How one image relates to a requested single object (``color``/``shape`` None: nothing requested)."""
    one = len(detections) == 1
    has_color = any(d.color == color for d in detections)
    has_shape = any(d.shape == shape for d in detections)
    exact = one and detections[0].color == color and detections[0].shape == shape
    return {"exact": exact, "one_object": one, "color": has_color, "shape": has_shape}


def _sheet(images: list, columns: int, scale: int = 2):
    """A grid of equally sized PIL images (upscaled ``scale`` times, nearest), for looking at."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w * scale, rows * h * scale), (255, 255, 255))
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        sheet.paste(im.resize((w * scale, h * scale), Image.Resampling.NEAREST), (c * w * scale, r * h * scale))
    return sheet


def _mean_verdicts(rows: list[dict[str, float]]) -> dict[str, float] | None:
    return {v: sum(r[v] for r in rows) / len(rows) for v in VERDICTS} if rows else None


def measure(infer: UniInfer, num_seeds: int = 64, seed: int = 0, cfg_scale: float = DEFAULT_CFG_SCALE,
            batch_size: int = 64, pairs: list[tuple[str, str]] | None = None,
            sampling: SamplingSettings = IMAGE_DEFAULTS,
            unseen_pairs: tuple[tuple[str, str], ...] = ()) -> tuple[dict[str, Any], dict]:
    """The figures of the module docstring, and the images per prompt (``{prompt: [GeneratedImage]}``).
    ``unseen_pairs``: the (colour, shape) pairs the training world held out (split out of the pair means)."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds={num_seeds} must be >= 1")
    pairs = pairs or [(c, s) for s in SHAPES for c in COLORS]
    prompts: list[tuple[str | None, str | None, str | None]] = [(photo_caption(c, s), c, s) for c, s in pairs]
    prompts.append((None, "red", "circle"))  # the control: the unconditional prompt judged as "a red circle"
    table: dict[str, dict[str, float]] = {}
    images: dict[str, list] = {}
    per = max(1, batch_size // num_seeds)  # prompts per generate call: all their samples fit one batch
    chunks = [prompts[i:i + per] for i in range(0, len(prompts), per)]
    for chunk in tqdm(chunks, desc="drawing", unit="batch"):
        # None is the unconditional prompt (t2i_prompt_ids(None)); its CFG twin is itself, so guidance is a no-op
        drawn_per_prompt = infer.generate_images([t for t, _, _ in chunk], num_seeds, seed=seed, cfg_scale=cfg_scale,
                                                 sampling=sampling, batch_size=batch_size)
        for (text, color, shape), drawn in zip(chunk, drawn_per_prompt):
            found = [verdicts(detect(g.image), color, shape) for g in drawn]
            key = text if text is not None else "<unconditional>"
            table[key] = {v: sum(f[v] for f in found) / len(found) for v in VERDICTS}
            table[key].update(color_name=color, shape_name=shape)
            images[key] = drawn
    unseen = {tuple(p) for p in unseen_pairs}
    for c, s in pairs:
        table[photo_caption(c, s)]["unseen"] = (c, s) in unseen
    pair_rows = [table[photo_caption(c, s)] for c, s in pairs]
    summary = {
        "red_circle": table.get(photo_caption("red", "circle"), {}).get("exact"),
        "uncond_red_circle": table["<unconditional>"]["exact"],
        "uncond_one_object": table["<unconditional>"]["one_object"],
        "pair_mean": _mean_verdicts(pair_rows),
        "seen_pair_mean": _mean_verdicts([r for r in pair_rows if not r["unseen"]]),
        "unseen_pair_mean": _mean_verdicts([r for r in pair_rows if r["unseen"]]),
        "unseen_pairs": [list(p) for p in unseen_pairs],
        "num_seen_pairs": sum(not r["unseen"] for r in pair_rows), "num_unseen_pairs": sum(r["unseen"] for r in pair_rows),
        "num_seeds": num_seeds, "seed": seed, "cfg_scale": cfg_scale, "sampling": asdict(sampling),
        "table": table,
    }
    return summary, images


def format_table(summary: dict[str, Any]) -> str:
    """The 40-pair exact rates as a markdown table (rows: colours, columns: shapes; ``*``: a pair held out of
    training) plus the headline figures."""
    lines = ["| colour | " + " | ".join(SHAPES) + " |", "|---" * (len(SHAPES) + 1) + "|"]

    def cell(row: dict | None) -> str:
        return "-" if not row else f"{100 * row['exact']:.0f}%" + ("*" if row.get("unseen") else "")

    for c in COLORS:
        lines.append(f"| {c} | " + " | ".join(cell(summary["table"].get(photo_caption(c, s))) for s in SHAPES) + " |")
    pm = summary["pair_mean"]
    lines += ["", f"red circle exact: {100 * summary['red_circle']:.1f}%   unconditional red circle: "
              f"{100 * summary['uncond_red_circle']:.1f}%   (unconditional: one object {100 * summary['uncond_one_object']:.1f}%)",
              f"40-pair mean: exact {100 * pm['exact']:.1f}%, one object {100 * pm['one_object']:.1f}%, "
              f"right colour present {100 * pm['color']:.1f}%, right shape present {100 * pm['shape']:.1f}%"]
    if summary.get("unseen_pair_mean"):
        seen, unseen = summary["seen_pair_mean"], summary["unseen_pair_mean"]
        lines.append(f"seen pairs ({summary['num_seen_pairs']}): exact {100 * seen['exact']:.1f}%   "
                     f"unseen pairs* ({summary['num_unseen_pairs']}, held out of training): exact "
                     f"{100 * unseen['exact']:.1f}%, right colour {100 * unseen['color']:.1f}%, "
                     f"right shape {100 * unseen['shape']:.1f}%")
    return "\n".join(lines)


def gate_reasons(summary: dict[str, Any], min_pair_exact_pct: float | None = None,
                 max_uncond_pct: float | None = None) -> list[str]:
    """Why a checkpoint fails the drawing gate (empty: it passes or no threshold is set). The pair floor applies to
    the pairs seen in training (all 40 when the world holds none out)."""
    reasons = []
    seen = summary.get("seen_pair_mean") or summary["pair_mean"]
    exact = 100 * seen["exact"]
    if min_pair_exact_pct is not None and exact < min_pair_exact_pct:
        what = "seen-pair" if summary.get("unseen_pairs") else "40-pair"
        reasons.append(f"{what} mean exact rate {exact:.1f}% < {min_pair_exact_pct}%")
    uncond = 100 * summary["uncond_red_circle"]
    if max_uncond_pct is not None and uncond > max_uncond_pct:
        reasons.append(f"the unconditional prompt draws one red circle in {uncond:.1f}% > {max_uncond_pct}% "
                       "(the model draws it whatever it is asked)")
    return reasons


def main(checkpoint: str, num_seeds: int = 64, seed: int = 0, cfg_scale: float = DEFAULT_CFG_SCALE,
         batch_size: int = 64, out: str | None = None, device: str | None = None, temperature: float | None = None,
         top_k: int | None = None, top_k_fraction: float | None = None, top_p: float | None = None,
         min_pair_exact_pct: float | None = None, max_uncond_pct: float | None = None,
         world: str | None = None) -> dict[str, Any]:
    """Measure ``checkpoint`` and write ``results.json``, ``table.md`` and contact sheets to ``out``
    (default ``<checkpoint>/shapes_t2i``). Sampling settings left None are :data:`IMAGE_DEFAULTS`'.

    With ``min_pair_exact_pct`` / ``max_uncond_pct`` this is the checkpoint's quality gate (train.sh's
    ``CKPT_GATE_*``): below it the command exits with status 1 and says why, after writing everything.
    ``world``: the built shapes world the checkpoint was trained on, for its held-out pairs (module docstring)."""
    from uni_arch.log_setup import setup_logging

    setup_logging(0)
    infer = UniInfer.from_checkpoint(checkpoint, **({"device": device} if device else {}))
    given = dict(temperature=temperature, top_k=top_k, top_k_fraction=top_k_fraction, top_p=top_p)
    sampling = replace(IMAGE_DEFAULTS, **{k: v for k, v in given.items() if v is not None})
    unseen_pairs = load_world(world).unseen_pairs if world else ()
    summary, images = measure(infer, num_seeds, seed, cfg_scale, batch_size, sampling=sampling,
                              unseen_pairs=unseen_pairs)
    summary["world"] = str(Path(world).resolve()) if world else None
    summary["checkpoint"] = str(Path(checkpoint).resolve())
    folder = Path(out) if out else Path(checkpoint) / "shapes_t2i"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(summary, indent=2) + "\n")
    text = format_table(summary)
    atomic_write_text(folder / "table.md", text + "\n")
    red = images[photo_caption("red", "circle")]
    _sheet([g.image for g in red], columns=16).save(folder / "red_circle.png")
    _sheet([g.image for g in images["<unconditional>"]], columns=16).save(folder / "unconditional.png")
    firsts = [images[photo_caption(c, s)][k].image for c in COLORS for s in SHAPES for k in range(min(4, num_seeds))]
    _sheet(firsts, columns=4 * min(4, num_seeds)).save(folder / "pairs.png")
    print(text)
    logger.info(f"wrote {folder}/results.json, table.md, red_circle.png, unconditional.png, pairs.png")
    reasons = gate_reasons(summary, min_pair_exact_pct, max_uncond_pct)
    if reasons:
        raise SystemExit(f"{checkpoint}: below the drawing gate ({num_seeds} seeds): {'; '.join(reasons)}. "
                         f"Look at {folder}/pairs.png; train longer (MAX_STEPS) or check the data mix.")
    return {k: v for k, v in summary.items() if k != "table"}


if __name__ == "__main__":
    fire.Fire(main)
