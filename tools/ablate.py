"""The architecture ablation on the shapes world: dense vs Uni-X vs MoT, one command.

    python tools/ablate.py                                   # the default: ~34 min on 2 CPU cores, set-up included
    python tools/ablate.py --seeds 3                         # three training seeds per variant, spread shown
    python tools/ablate.py --preset ci --out_dir /tmp/abl    # the tiny end-to-end run the test does (~1 min)
    python tools/ablate.py --plan_only                       # print the plan and the time estimate, run nothing

Why one command: the comparison only means something when everything but the architecture is held fixed. So the
shapes world (with a compositional split: ``heldout_pairs`` (colour, shape) pairs never shown in training), its text
tokenizer, its VQ and its code-ID records are built ONCE (the Python steps of train.sh's set-up; an existing
``data/shapes`` tokenizer and VQ are reused, after the VQ's quality gate), and every variant is trained by
``train.sh`` with the same data, tokenizer, steps and seed, only ``MODEL_SPEC_MODULE`` differing (``dense`` /
``x`` / ``mot``). The tiny configs give every variant the same ACTIVE parameters per token (a text token reads the
dense weights or their text branch, an image token the vision branch of the same width); the table reports total and
active counts per variant (active = total minus the other modality's branch, from
`modeling.conversion.vision_text_pairs`), and the run stops if the active counts differ.

Each trained variant is then evaluated:

* held-out text loss and image loss (``text_loss`` / ``image_loss`` exactly as training logs them) on code records of
  ANOTHER world seed (``heldout_seed``), rendered with the run's own data arguments but no CFG dropout;
* shapes GenEval (overall, and on seen / unseen pairs) and shapes VQA accuracy, through the evaluation orchestrator
  (`evaluation.eval_template.main` over an experiment file written here);
* the gradient conflict (`tools/analyze_model_grad.py`), drawn for dense vs Uni-X per layer by
  `draw_pics/grad_conflict.py`.

Outputs (``out_dir``): ``data/`` (world, tokenizer, VQ, records, held-out records), ``runs/<variant>-s<seed>/``
(checkpoints, ``heldout_loss.json``, ``params.json``, ``grad/``), ``eval/`` (the orchestrator's folders and summary),
``ablation.md`` / ``ablation.csv`` / ``ablation.json`` (the table; mean and standard deviation over seeds),
``plots/ablation_bars.png`` and ``plots/grad/conflict_per_layer.png``, ``timings.json`` (measured time per step).

Resumable: a run with its ``model.safetensors`` is not trained again, a benchmark with its ``results.json`` is not
run again, a held-out loss / grad analysis already on disk is read back. The plan printed first says what is done
and estimates the rest (from ``timings.json`` of an earlier run when there is one, else from the measured figures
in ``DEFAULT_SECONDS``).

``score`` (the reference's single averaged number) is here the mean of shapes GenEval overall (in %) and shapes VQA
accuracy (%): the two benchmarks this world has for generation and understanding.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import fire
from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_process.schema import atomic_write_text  # noqa: E402
from uni_arch.log_setup import setup_logging  # noqa: E402

# variant name (config.variant) -> train.sh's MODEL_SPEC_MODULE
VARIANTS: dict[str, str] = {"dense": "dense", "uni_x": "x", "mot": "mot"}
METRICS = ("text_loss", "image_loss", "geneval", "geneval_seen", "geneval_unseen", "vqa", "score")
LOWER_IS_BETTER = ("text_loss", "image_loss")
TRAIN_SH = ROOT / "train.sh"
# Measured figures behind the first estimate (before this out_dir has timings.json of its own):
# training 0.38 s/step (README: train.sh's 1,600 steps of 1 x 2,048 tokens in 608 s on 2 cores); the rest are rough guesses per run
# (train.sh's start and reports, held-out loss, the orchestrator's GenEval + VQA, the gradient analysis).
DEFAULT_SECONDS = {"train_step": 0.38, "train_start": 30.0, "heldout_loss": 30.0, "eval": 120.0, "grad": 60.0}


@dataclass
class Preset:
    """Everything that sizes one ablation (a field of None: train.sh's default)."""

    num_images: int | None = None  # training scenes (None: train.sh's SHAPES_NUM_IMAGES)
    max_steps: int | None = None  # training steps per run (None: train.sh's MAX_STEPS)
    heldout_pairs: int = 4  # (colour, shape) pairs kept out of training (unseen-pair GenEval)
    image_size: int = 64
    heldout_seed: int = 1  # world seed of the held-out loss records and the VQA scenes (not the training world's 0)
    heldout_images: int = 400  # held-out loss records: captions/VQA of this many scenes, half as many text lines
    heldout_max_docs: int = 600  # documents of the held-out loss
    shapes_per_tag: int = 8  # GenEval prompts per tag
    shapes_unseen_per_pair: int = 4
    n_samples: int = 2  # images per GenEval prompt
    vqa_scenes: int = 32
    eval_limit: int | None = None  # the orchestrator's --limit
    grad_tokens: int = 4096  # analyze_model_grad tokens_per_set
    tokenizer_dir: str | None = "data/shapes/tokenizer"  # reused when it exists, else trained into out_dir
    vq_dir: str | None = "data/shapes/vq"  # reused when it exists (and passes its gate), else trained into out_dir
    vq_args: dict[str, Any] | None = None  # train_vq arguments when a VQ is trained here (None: its defaults)
    tokenizer_args: dict[str, Any] | None = None  # text_tokenizer.py train arguments when one is trained here
    model_overrides: dict[str, Any] | None = None  # fields replaced in configs/model/tiny_uni_x.json
    train_env: dict[str, str] | None = None  # more train.sh knobs
    threads: int = 2


PRESETS: dict[str, Preset] = {
    "default": Preset(),
    # Tiny everything: a world of 48 32-px scenes, a VQ of 64 codes on a 8x8 grid trained for 4 steps (no gate), a
    # 32-wide model, 20 steps, one prompt per tag and split, one VQA question. The numbers mean nothing; the run
    # exercises every step and writes every file the default writes.
    "ci": Preset(
        num_images=48, max_steps=20, heldout_pairs=2, image_size=32, heldout_images=6, heldout_max_docs=12,
        shapes_per_tag=1, shapes_unseen_per_pair=1, n_samples=1, vqa_scenes=2, eval_limit=1, grad_tokens=48,
        tokenizer_dir=None, vq_dir=None, threads=1, tokenizer_args={"n_scenes": 200, "n_texts": 2000},
        vq_args={"num_train": 32, "num_eval": 8, "max_steps": 4, "batch_size": 16, "warmup_steps": 1,
                 "precision": "fp32", "num_threads": 1, "codebook_size": 64, "code_dim": 8, "channels": (8, 16, 16),
                 "enc_res_blocks": 0, "dec_res_blocks": 0, "mid_res_blocks": 0, "image_size": 32,
                 "min_detector_pct": 0.0, "min_psnr_db": 0.0, "min_gate_scenes": 1, "min_background_pct": 0.0},
        model_overrides={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "max_position_embeddings": 1024},
        train_env={"MODEL_MAX_LENGTH": "512", "TRAIN_BATCH_SIZE": "1", "LOGGING_STEPS": "5", "LEARNING_RATE": "3e-3"},
    ),
}


# ------------------------------------------------------------------------------------------------ helpers
def train_sh_default(name: str) -> str:
    """The default of one of train.sh's knobs (``: "${NAME=value}"``): train.sh stays the one source of them."""
    match = re.search(rf'^: "\${{{name}=(.*)}}"', TRAIN_SH.read_text(encoding="utf-8"), re.MULTILINE)
    if not match:
        raise ValueError(f"{TRAIN_SH}: no default for {name}")
    return match.group(1)


def read_json(path: Path) -> Any:
    """A json file written by this tool or the tools it drives; a broken one names itself."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid json ({e.msg}); delete it to redo that step") from e


class Clock:
    """Wall time per phase, kept in ``timings.json`` so the next plan estimates from this machine's figures."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, float] = read_json(path) if path.is_file() else {}

    def record(self, key: str, seconds: float) -> None:
        self.data[key] = round(seconds, 2)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def timed(self, key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.record(key, time.perf_counter() - t0)
        return result

    def estimate(self, key: str) -> float:
        return self.data.get(key, DEFAULT_SECONDS[key])


# ---------------------------------------------------------------------------------------------- the data
@dataclass
class Data:
    """The paths of the shared set-up."""

    world: Path
    tokenizer: Path
    vq: Path
    codes: Path
    heldout_codes: Path
    model_config: Path

    @property
    def data_path(self) -> str:
        """train.sh's DATA_PATH mixture over the training records."""
        return mixture(self.codes)

    @property
    def heldout_data_path(self) -> str:
        """The same mixture over the held-out world's records."""
        return mixture(self.heldout_codes)


def mixture(codes: Path) -> str:
    """train.sh's DATA_PATH (captions, VQA and text with its weights) over the records in ``codes``."""
    return train_sh_default("DATA_PATH").replace("${SHAPES_CODES_DIR}", str(codes))


def _encode(world: Path, codes: Path, vq: Path) -> None:
    from data_process.encode_images import encode

    if not (codes / "manifest.json").is_file():
        encode(data_config=str(world / "data_config.yaml"), out_dir=str(codes), tokenizer="shapes",
               checkpoint=str(vq), num_workers=1)


def setup_data(out: Path, p: Preset, num_images: int) -> Data:
    """World (with the split), tokenizer, VQ (gate-checked), code records, held-out records: each skipped when done."""
    from data_process import shapes_world, train_vq
    from data_process.text_tokenizer import _CLI as TokenizerCLI

    root = out / "data"
    world, heldout_world = root / "world", root / "heldout_world"
    if not (world / "world.json").is_file() or not read_json(world / "world.json").get("complete"):
        shapes_world.build(out_dir=str(world), num_images=num_images, seed=0, image_size=p.image_size,
                           heldout_pairs=p.heldout_pairs, geneval_per_tag=1)
    tokenizer = Path(p.tokenizer_dir) if p.tokenizer_dir and (Path(p.tokenizer_dir) / "tokenizer.json").is_file() \
        else root / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():  # train.sh's step: text_tokenizer.py train
        TokenizerCLI().train(out_dir=str(tokenizer), **(p.tokenizer_args or {}))
    vq = Path(p.vq_dir) if p.vq_dir and (Path(p.vq_dir) / "metrics.json").is_file() else root / "vq"
    gate = {k: v for k, v in (p.vq_args or {}).items() if k.startswith("min_")}
    if not (vq / "metrics.json").is_file():
        train_vq.train_vq(out_dir=str(vq), **(p.vq_args or {}))
    if gate.get("min_detector_pct", 1) > 0:  # the CI preset's VQ is trained for 4 steps: no gate to pass
        gate_args = {("min_scenes" if k == "min_gate_scenes" else k): v for k, v in gate.items()}
        train_vq.check_gate(out_dir=str(vq), **gate_args)
    _encode(world, root / "codes", vq)
    if not (heldout_world / "world.json").is_file() or not read_json(heldout_world / "world.json").get("complete"):
        shapes_world.build(out_dir=str(heldout_world), num_images=p.heldout_images, seed=p.heldout_seed,
                           image_size=p.image_size, geneval_per_tag=1)
    _encode(heldout_world, root / "heldout_codes", vq)
    model_config = root / "model_config.json"
    config = read_json(ROOT / "configs" / "model" / "tiny_uni_x.json")
    config.update(p.model_overrides or {})
    atomic_write_text(model_config, json.dumps(config, indent=2) + "\n")
    return Data(world, tokenizer, vq, root / "codes", root / "heldout_codes", model_config)


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Run:
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def trained(run_dir: Path) -> bool:
    return (run_dir / "model.safetensors").is_file() and (run_dir / "run_args.json").is_file()


def train(run: Run, run_dir: Path, data: Data, p: Preset, max_steps: int) -> None:
    """One variant through train.sh: only MODEL_SPEC_MODULE and SEED differ between runs of one ablation."""
    env = {**os.environ, "SETUP_SHAPES": "0", "DATA_PATH": data.data_path, "TOKENIZER_PATH": str(data.tokenizer),
           "IMAGE_TOKENIZER_PATH": str(data.vq), "MODEL_CONFIG": str(data.model_config), "OUTPUT_DIR": str(run_dir),
           "RUN_NAME": f"ablate-{run.name}", "MODEL_SPEC_MODULE": VARIANTS[run.variant], "SEED": str(run.seed),
           "MAX_STEPS": str(max_steps), "SAVE_STEPS": str(max_steps), "CKPT_GATE_SEEDS": "0",
           "NUM_THREADS": str(p.threads),
           **(p.train_env or {})}
    logger.info(f"training {run.name} ({max_steps} steps) -> {run_dir}")
    proc = subprocess.run(["bash", str(TRAIN_SH)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not trained(run_dir):
        raise RuntimeError(f"train.sh failed for {run.name} (exit {proc.returncode}); the end of its output:\n"
                           + (proc.stdout + proc.stderr)[-4000:])


def parameter_counts(run_dir: Path) -> dict[str, int]:
    """Total parameters, and those one text / one image token reads (total minus the other modality's branches).

    The embedding table is counted whole (every variant has the same one). Built from the config with random
    weights: counting needs no trained values.
    """
    import torch
    from transformers import AutoConfig

    from modeling import build_model
    from modeling.conversion import vision_text_pairs

    with torch.device("meta"):
        model = build_model(AutoConfig.from_pretrained(str(run_dir)))
    total = sum(p.numel() for p in model.parameters())
    pairs = list(vision_text_pairs(model))
    vision_only = sum(pair.vision.numel() for pair in pairs)
    text_only = sum(pair.text.numel() for pair in pairs)
    return {"total": total, "active_text": total - vision_only, "active_image": total - text_only}


def heldout_losses(run_dir: Path, data_path: str, max_docs: int, seq_len: int) -> dict[str, float]:
    """Mean text and image token loss (the trainer's ``modality_losses``) on the held-out world's records."""
    import torch

    from tools import analyze_model_grad as grad
    from uni_arch.train.builders import build_sample_builder
    from uni_arch.train.data_collator import META_KEYS, UniDataCollator
    from uni_arch.train.trainer import modality_losses

    model = grad.load_model(run_dir, torch.device("cpu"))
    vocab = model.config.code_vocab
    data_args = replace(grad.data_arguments(run_dir, data_path), cfg_dropout=0.0)
    builder = build_sample_builder(data_args, grad.load_tokenizer(run_dir, vocab), vocab)
    docs = grad.analysis_documents(data_args, builder, vocab, seed=0)[:max_docs]
    rows = grad.packed_rows(docs, seq_len)
    collator = UniDataCollator(0, 2, max(len(r["input_ids"]) for r in rows))
    sums = {"text_loss_sum": 0.0, "text_tokens": 0, "image_loss_sum": 0.0, "image_tokens": 0}
    with torch.no_grad():
        for row in rows:
            batch = collator([row])
            labels = batch.pop("labels")
            inputs = {k: v for k, v in batch.items() if k not in META_KEYS}
            parts = modality_losses(model(**inputs, use_cache=False).logits, labels, vocab)
            for key in sums:
                sums[key] += parts[key].item()
    if not sums["text_tokens"] or not sums["image_tokens"]:
        raise ValueError(f"{data_path}: the held-out records gave {sums['text_tokens']} text and "
                         f"{sums['image_tokens']} image targets; both must be > 0")
    return {"text_loss": sums["text_loss_sum"] / sums["text_tokens"],
            "image_loss": sums["image_loss_sum"] / sums["image_tokens"],
            "text_tokens": int(sums["text_tokens"]), "image_tokens": int(sums["image_tokens"]), "documents": len(docs)}


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``path``'s json if it is there, else ``compute()`` written to it."""
    if path.is_file():
        return read_json(path)
    value = compute()
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
    return value


# ---------------------------------------------------------------------------------------------- evaluation
def experiment(run: Run, run_dir: Path, data: Data, p: Preset) -> dict[str, Any]:
    """One orchestrator experiment (evaluation/exp.py's format) for one trained run."""
    return {"name": run.name, "model_path": str(run_dir), "shapes_world": str(data.world),
            "eval_type": ["shapes", "shapes_vqa"], "seed": 0, "t2i_devices": ["cpu"],
            "shapes_per_tag": p.shapes_per_tag, "shapes_unseen_per_pair": p.shapes_unseen_per_pair,
            "n_samples": p.n_samples, "shapes_vqa_seed": p.heldout_seed, "shapes_vqa_scenes": p.vqa_scenes,
            "vis_und_server_devices": ["cpu"], "vis_und_api_nproc": 4, "vis_und_max_tokens": 10,
            "vis_und_threads": p.threads}


def evaluated(eval_dir: Path, run: Run) -> bool:
    return all((eval_dir / run.name / b / "results.json").is_file() for b in ("shapes", "shapes_vqa"))


def evaluate(runs: Sequence[Run], run_dirs: dict[Run, Path], data: Data, p: Preset, out: Path) -> None:
    """The runs not yet evaluated, through `evaluation.eval_template.main` over an experiment file written here."""
    from evaluation import eval_template

    todo = [r for r in runs if not evaluated(out / "eval", r)]
    if not todo:
        return
    exp_file = out / "eval" / "experiments.py"
    exp_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp_file, f"EXPERIMENTS = {[experiment(r, run_dirs[r], data, p) for r in runs]!r}\n")
    eval_template.main(only=",".join(r.name for r in todo), out_dir=str(out / "eval"), exp_file=str(exp_file),
                       limit=p.eval_limit, charts=False)


def eval_metrics(eval_dir: Path, run: Run) -> dict[str, float | None]:
    """The table's benchmark numbers of one run from the orchestrator's results.json files (GenEval in %)."""
    shapes = read_json(eval_dir / run.name / "shapes" / "results.json")["headline"]
    vqa = read_json(eval_dir / run.name / "shapes_vqa" / "results.json")["headline"]
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    geneval = pct(shapes["model"])
    return {"geneval": geneval, "geneval_seen": pct(shapes.get("model_seen")),
            "geneval_unseen": pct(shapes.get("model_unseen")), "vqa": vqa["accuracy"],
            "score": (geneval + vqa["accuracy"]) / 2}


# ---------------------------------------------------------------------------------------------- the table
def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: mean and sample standard deviation (0 for one seed) of every metric, and the parameter counts."""
    table = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "seeds": len(mine),
                                 **{k: mine[0]["params"][k] for k in ("total", "active_text", "active_image")}}
        for m in METRICS:
            values = [r[m] for r in mine if r.get(m) is not None]
            entry[m] = statistics.fmean(values) if values else None
            entry[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        table.append(entry)
    return table


def markdown(table: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The table as markdown: ``mean ± std`` per cell when there are several seeds, the best per column in bold."""
    heads = ["variant", "params total", "active / text token", "active / image token", *METRICS]
    lines = ["# Ablation on the shapes world: dense vs Uni-X vs MoT", "",
             f"Settings: {json.dumps(settings)}", "",
             "Losses: mean per target on held-out records (lower is better); GenEval (shapes, %) overall / seen / "
             "unseen pairs; VQA accuracy (%); score = mean of GenEval and VQA. Mean ± std over seeds.", "",
             "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    best = {}  # the one best variant per column (none bold on a tie)
    for m in METRICS:
        values = [t[m] for t in table if t[m] is not None]
        top = (min if m in LOWER_IS_BETTER else max)(values) if values else None
        if values and values.count(top) == 1:
            best[m] = top
    for t in table:
        cells = [t["variant"], f"{t['total']:,}", f"{t['active_text']:,}", f"{t['active_image']:,}"]
        for m in METRICS:
            if t[m] is None:
                cells.append("-")
                continue
            digits = 3 if m in LOWER_IS_BETTER else 1
            text = f"{t[m]:.{digits}f}" + (f" ± {t[m + '_std']:.{digits}f}" if t["seeds"] > 1 else "")
            cells.append(f"**{text}**" if m in best and t[m] == best[m] else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Reference (Uni-X paper, 1.5B, its averaged score): Uni-X 41.6 > dense 38.0 > MoT 34.6.", ""]
    return "\n".join(lines)


def write_table(out: Path, rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """ablation.md / .csv / .json and the seaborn bar chart."""
    import csv
    import io

    table = summarize(rows)
    atomic_write_text(out / "ablation.md", markdown(table, settings))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    atomic_write_text(out / "ablation.json", json.dumps({"settings": settings, "table": table, "runs": list(rows)},
                                                        indent=2) + "\n")
    draw_bars(rows, out / "plots" / "ablation_bars.png")
    return {"table": table}


def draw_bars(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per metric, a bar per variant (mean over seeds), the error bar the standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    long = pd.DataFrame([{"variant": r["variant"], "metric": m, "value": r[m]} for r in rows for m in METRICS
                         if r.get(m) is not None])
    grid = sns.catplot(data=long, x="variant", y="value", col="metric", kind="bar", errorbar="sd", sharey=False,
                       col_wrap=4, height=2.6, aspect=0.9, hue="variant", legend=False)
    grid.set_titles("{col_name}")
    for ax in grid.axes.flat:  # every metric is >= 0: bars from 0 (all-zero panels of a CI run included)
        ax.set_ylim(bottom=0.0, top=max(ax.get_ylim()[1], 1e-3))
    grid.figure.suptitle("shapes-world ablation (error bars: std over seeds)", y=1.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(grid.figure)


# ---------------------------------------------------------------------------------------------- entry point
def plan(runs: Sequence[Run], run_dirs: dict[Run, Path], out: Path, clock: Clock, max_steps: int) -> float:
    """Log what will run and what is done, with the time estimate; returns the estimate in seconds."""
    total, lines = 0.0, []
    per_train = clock.estimate("train_start") + max_steps * clock.estimate("train_step")
    for r in runs:
        d = run_dirs[r]
        steps = [("train", trained(d), per_train), ("held-out loss", (d / "heldout_loss.json").is_file(),
                                                    clock.estimate("heldout_loss")),
                 ("eval", evaluated(out / "eval", r), clock.estimate("eval")),
                 ("grad", (d / "grad" / "grad_conflict.csv").is_file(), clock.estimate("grad"))]
        cost = sum(s for _, done, s in steps if not done)
        total += cost
        lines.append(f"  {r.name:12s} " + ", ".join(f"{n} {'done' if done else f'~{s / 60:.1f} min'}"
                                                     for n, done, s in steps))
    logger.info(f"ablation plan ({len(runs)} runs, {max_steps} steps each) -> {out}\n" + "\n".join(lines)
                + f"\n  estimated time after set-up: {total / 60:.1f} min")
    return total


def main(out_dir: str = "outputs/ablation", preset: str = "default", seeds: int = 1, base_seed: int = 42,
         variants: str | Sequence[str] = tuple(VARIANTS), plan_only: bool = False, **overrides: Any) -> dict[str, Any]:
    """Build the data once, train every variant x seed, evaluate, analyse, tabulate (module docstring).

    Args:
        out_dir: everything goes here; rerunning on it resumes.
        preset: ``default`` (the full ablation) or ``ci`` (tiny; a test runs it end to end).
        seeds: training seeds per variant (``base_seed``, ``base_seed + 1``, ...); > 1 shows the spread.
        variants: a subset of ``dense,uni_x,mot``.
        plan_only: print the plan and estimate; train nothing.
        overrides: any `Preset` field (``--max_steps 300 --heldout_pairs 6 --vqa_scenes 64``).
    """
    setup_logging(0)
    if preset not in PRESETS:
        raise ValueError(f"--preset: {preset!r} is not one of {sorted(PRESETS)}")
    known = {f.name for f in fields(Preset)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; the preset fields are {sorted(known)}")
    p = replace(PRESETS[preset], **overrides)
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ValueError(f"--variants: {bad or names} not among {list(VARIANTS)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds: must be a positive integer, got {seeds!r}")
    max_steps = p.max_steps or int(train_sh_default("MAX_STEPS"))
    num_images = p.num_images or int(train_sh_default("SHAPES_NUM_IMAGES"))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(out / "timings.json")
    runs = [Run(v, base_seed + i) for i in range(seeds) for v in names]
    run_dirs = {r: out / "runs" / r.name for r in runs}
    estimate = plan(runs, run_dirs, out, clock, max_steps)
    if plan_only:
        return {"estimate_s": estimate, "runs": [r.name for r in runs]}

    data = clock.timed("setup", lambda: setup_data(out, p, num_images))
    seq_len = int((p.train_env or {}).get("MODEL_MAX_LENGTH", train_sh_default("MODEL_MAX_LENGTH")))
    rows = []
    for r in runs:
        d = run_dirs[r]
        if not trained(d):
            t0 = time.perf_counter()
            train(r, d, data, p, max_steps)
            runtime = read_json(d / "run_args.json")["metrics"]["train_runtime"]  # the Trainer's own loop time
            clock.record("train_step", runtime / max_steps)
            clock.record("train_start", time.perf_counter() - t0 - runtime)  # train.sh around it: imports, reports
        params = cached(d / "params.json", lambda: parameter_counts(d))
        losses = cached(d / "heldout_loss.json", lambda: clock.timed(
            "heldout_loss", lambda: heldout_losses(d, data.heldout_data_path, p.heldout_max_docs, seq_len)))
        rows.append({"run": r.name, "variant": r.variant, "seed": r.seed, "params": params,
                     "text_loss": losses["text_loss"], "image_loss": losses["image_loss"]})
    actives = {(row["params"]["active_text"], row["params"]["active_image"]) for row in rows}
    if len(actives) != 1:
        raise RuntimeError(f"the variants differ in active parameters per token: "
                           f"{ {row['run']: row['params'] for row in rows} }; the comparison would not be fair")
    todo = [r for r in runs if not evaluated(out / "eval", r)]
    if todo:
        t0 = time.perf_counter()
        evaluate(runs, run_dirs, data, p, out)
        clock.record("eval", (time.perf_counter() - t0) / len(todo))
    from tools import analyze_model_grad

    for r, row in zip(runs, rows):
        row.update(eval_metrics(out / "eval", r))
        grad_dir = run_dirs[r] / "grad"
        if not (grad_dir / "grad_conflict.csv").is_file():
            clock.timed("grad", lambda: analyze_model_grad.main(model_name_or_path=str(run_dirs[r]),
                                                                output_dir=str(grad_dir),
                                                                tokens_per_set=p.grad_tokens, cpu=True))
        row["grad_csv"] = str(grad_dir / "grad_conflict.csv")
    settings = {"preset": preset, "max_steps": max_steps, "num_images": num_images, "seeds": [r.seed for r in runs
                if r.variant == names[0]], **{k: v for k, v in asdict(p).items() if k not in ("vq_args",)}}
    result = write_table(out, rows, settings)
    plots = draw_grad(runs, run_dirs, out / "plots" / "grad")
    logger.info(f"ablation table ({out / 'ablation.md'}):\n" + (out / "ablation.md").read_text(encoding="utf-8"))
    return {"table": result["table"], "plots": [str(out / "plots" / "ablation_bars.png"), *plots],
            "out_dir": str(out)}


def draw_grad(runs: Sequence[Run], run_dirs: dict[Run, Path], out: Path) -> list[str]:
    """The per-layer conflict of dense vs Uni-X (every seed of each), by draw_pics/grad_conflict.py."""
    from draw_pics.grad_conflict import draw

    chosen = [r for r in runs if r.variant in ("dense", "uni_x")]
    if not chosen:
        return []
    return draw([str(run_dirs[r] / "grad" / "grad_conflict.csv") for r in chosen], out, [r.name for r in chosen])


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: json.dumps({k: v for k, v in result.items() if k != "table"}))
