"""Gradient conflict between text and multimodal data, per layer and weight type: the measurement behind Uni-X.

    python tools/analyze_model_grad.py --model_name_or_path outputs/shapes-tiny-uni-x --output_dir /tmp/grad
    python tools/analyze_model_grad.py --model_name_or_path outputs/my_run --output_dir /tmp/grad  # every checkpoint-*
    accelerate launch --multi_gpu --num_processes 2 tools/analyze_model_grad.py --model_name_or_path ... --cpu
    python draw_pics/grad_conflict.py --csv /tmp/grad/grad_conflict.csv --out_dir /tmp/grad/plots

**What is measured.** Four sample sets come from the data (default: the checkpoint's own training data, rendered
as training rendered it: the same sources, mixture weights, t2i ratio, CFG dropout, chat format and per-occurrence
draws of data epoch 0, from ``run_args.json``):

    text   samples without any vision token (``CodeVocab.is_vision_id``: text-only records)
    mm     samples with at least one vision token (captions as t2i or i2t, VQA, ...)
    A, B   the two halves of a random split of all samples (text and multimodal as the mixture has them)

Each set is cut to exactly ``tokens_per_set`` trained targets (the last sample's later targets are masked), and
its gradient is that of the mean token loss over the set, so the four are estimates of the same size. For every
decoder layer and weight type (``q, k, v, o, gate, up, down``), on the flattened weight gradients g:

    similarity = cos(g_text, g_mm) - cos(g_A, g_B)        conflict = -similarity

as in the reference. ``cos(g_A, g_B)`` is the noise baseline: two same-sized samples of one distribution agree only
that much, so a positive conflict means text and multimodal data pull the weight apart more than sampling does.

**Branches** (from ``config.layer_kinds`` and `modeling.conversion.vision_text_pairs`, the one pairing of the two
branches, which conversion uses too):

    shared   a weight every token passes through (dense, Uni-X middle layers, MoE attention)
    text     the text branch of a separated (Uni-X) or MoT layer, the text expert of an MoE layer: only text tokens
             reach it, from text-only and multimodal samples alike; compared by the same formula
    vision   the vision branch/expert: only vision tokens reach it, so text-only samples give it no gradient
             (norm_text = 0) and everything built on cos(g_text, .) is N/A. Its own comparison, where the shapes
             match, is ``cos_branch = cos(g_mm on the vision weight, g_text on its text counterpart)``: how image
             data pulls the vision copy against how text pulls the text copy. It means something only when the two
             copies share coordinates (the vision branch began as a copy of the text one, as modeling/conversion.py
             initialises it); between independent random inits it is ~0 by construction. Not baseline-adjusted.
    share    ``add_share_ffn=1``: the shared FFN (``share_mlp``) of a middle layer that every token adds to its own
             modality's FFN; compared like ``shared`` (its layer's ``mlp`` is then the ``text`` branch)

The reference compared only Uni-X's shared middle layers; here every layer is reported, with its kind.
**N/A**: a cosine with a zero-norm gradient is never computed (csv ``N/A``, json ``null``), nor is any similarity
or conflict built from it.

**Ranks.** Under ``torchrun`` / ``accelerate launch`` every rank selects the same samples, runs every
``world_size``-th packed row of a set, and the summed gradients are all-reduced: the result is one process's on the
same samples up to float summation order (``tests/test_analyze_model_grad.py`` runs 2 gloo ranks). On CPU pass
``--cpu`` (or have no GPU): accelerate then uses gloo.

**Cost.** 4 x ``tokens_per_set`` tokens of forward + backward per checkpoint in eval mode (no dropout: the gradient
of the trained function), with only the compared weights requiring grad; at most two sets of their gradients are
held at once (text and mm are compared and freed, then A and B). The shapes default (4 layers, hidden 256,
12,288 tokens a set) takes about a minute on 2 CPU cores (README, Tools).

**Outputs** (rank 0, written atomically; a checkpoint whose result with the same settings is on disk is not
recomputed, so an interrupted multi-checkpoint run resumes):

    <output_dir>/<checkpoint name>.json   one checkpoint: settings, sets (samples, tokens), rows, per-layer means
    <output_dir>/grad_conflict.csv         every checkpoint's rows (one per layer x weight type x branch)
    <output_dir>/grad_conflict.json        the settings and every checkpoint's result
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping, Sequence

import fire
import numpy as np
import torch
from loguru import logger
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_process.schema import atomic_write_text  # noqa: E402
from modeling.conversion import vision_text_pairs  # noqa: E402
from modeling.vocab import IGNORE_INDEX, CodeVocab  # noqa: E402
from uni_arch.log_setup import setup_logging  # noqa: E402
from uni_arch.train import dataset as ds  # noqa: E402
from uni_arch.train.args import DataArguments  # noqa: E402
from uni_arch.train.data_collator import META_KEYS, UniDataCollator  # noqa: E402
from uni_arch.train.hf_trainer import read_run_args  # noqa: E402
from uni_arch.train.trainer import modality_losses  # noqa: E402

WEIGHT_TYPES: dict[str, str] = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
BRANCHES = ("shared", "text", "vision", "share")
SETS = ("text", "mm", "a", "b")
NA = "N/A"
CSV_NAME, JSON_NAME = "grad_conflict.csv", "grad_conflict.json"
ROW_FIELDS = ("checkpoint", "step", "variant", "layer", "kind", "weight", "branch", "param", "counterpart",
              "norm_text", "norm_mm", "norm_a", "norm_b", "cos_text_mm", "cos_a_b", "similarity", "conflict",
              "cos_branch")


# ------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """One compared weight: its layer, the layer's kind, the weight type, the branch and the parameter name."""

    layer: int
    kind: str
    weight: str
    branch: str
    param: str
    counterpart: str | None = None  # vision: the text parameter of the same shape that cos_branch compares with


def weight_type(param_name: str) -> str | None:
    """``q`` .. ``down`` for a text/shared projection weight name, None for anything else (norms, biases)."""
    for weight, sub in WEIGHT_TYPES.items():
        if param_name.endswith(f".{sub}.weight"):
            return weight
    return None


def analysis_targets(model) -> list[Target]:
    """Every compared weight of ``model``, in (layer, weight type, branch) order.

    A text/shared weight is ``text`` when `vision_text_pairs` pairs it with a vision weight, else ``shared``; the
    vision weights are the pairs' other halves (norms are paired too, but are not compared).
    """
    kinds = model.config.layer_kinds
    params = dict(model.named_parameters())
    paired, targets = set(), []
    for pair in vision_text_pairs(model):
        weight = weight_type(pair.text_name)
        if weight is None:
            continue
        paired.add(pair.text_name)
        same_shape = pair.text.shape == pair.vision.shape
        targets.append(Target(pair.layer, kinds[pair.layer], weight, "vision", pair.vision_name,
                              pair.text_name if same_shape else None))
    for layer, kind in enumerate(kinds):
        for weight, sub in WEIGHT_TYPES.items():
            name = f"model.layers.{layer}.{sub}.weight"
            if name not in params:
                raise ValueError(f"layer {layer} ({kind}) has no parameter {name}: not a toolkit decoder layer")
            targets.append(Target(layer, kind, weight, "text" if name in paired else "shared", name))
            share = f"model.layers.{layer}.share_{sub}.weight"  # add_share_ffn: the FFN every token adds
            if share in params:
                targets.append(Target(layer, kind, weight, "share", share))
    order = list(WEIGHT_TYPES)
    return sorted(targets, key=lambda t: (t.layer, order.index(t.weight), BRANCHES.index(t.branch)))


# ------------------------------------------------------------------------------------------ samples
def trained_targets(labels: np.ndarray) -> int:
    """Targets a sample contributes in a packed row: every trained label but the first (the collator masks each
    document's first label: nothing is predicted across a boundary)."""
    return int((np.asarray(labels)[1:] != IGNORE_INDEX).sum())


def take_tokens(samples: Sequence[ds.RenderedSample], budget: int) -> list[ds.RenderedSample]:
    """The leading samples holding exactly ``budget`` trained targets; the last one's later targets are masked."""
    out, left = [], budget
    for sample in samples:
        if left == 0:
            break
        n = trained_targets(sample.labels)
        if n > left:
            labels = sample.labels.copy()
            trained = np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1
            labels[trained[left:]] = IGNORE_INDEX
            sample, n = replace(sample, labels=labels), left
        out.append(sample)
        left -= n
    if left:
        raise ValueError(f"take_tokens: the samples hold {budget - left} targets, fewer than {budget}")
    return out


@dataclass
class SampleSets:
    """The four sets (``SETS``), each with exactly ``tokens`` trained targets."""

    sets: dict[str, list[ds.RenderedSample]]
    tokens: int

    def describe(self, vocab: CodeVocab) -> dict[str, dict[str, int]]:
        """Per set: samples, trained targets, and how many of them are image targets."""
        out = {}
        for name, samples in self.sets.items():
            image = sum(int((vocab.is_image_target(s.labels[1:]) & (s.labels[1:] != IGNORE_INDEX)).sum())
                        for s in samples)
            out[name] = {"samples": len(samples), "tokens": sum(trained_targets(s.labels) for s in samples),
                         "image_tokens": image}
        return out


def is_multimodal(sample: ds.RenderedSample, vocab: CodeVocab) -> bool:
    """A sample with any vision token (the model's own definition of a vision token)."""
    return bool(vocab.is_vision_id(sample.input_ids).any())


def select_sets(samples: Iterable[ds.RenderedSample], vocab: CodeVocab, tokens_per_set: int) -> SampleSets:
    """Walk ``samples`` (already in a random order) into the text and multimodal pools and, alternately, the halves
    A and B, until each holds ``tokens_per_set`` targets; then cut all four to the same count (fewer, with a
    warning, when the data runs out first)."""
    if tokens_per_set <= 0:
        raise ValueError(f"tokens_per_set={tokens_per_set} must be positive")
    pools: dict[str, list[ds.RenderedSample]] = {name: [] for name in SETS}
    counts = dict.fromkeys(SETS, 0)
    position = 0
    for sample in samples:
        n = trained_targets(sample.labels)
        if n == 0:
            continue
        half = "a" if position % 2 == 0 else "b"  # the walk is shuffled: alternating positions = a random split
        position += 1
        for name in ("mm" if is_multimodal(sample, vocab) else "text", half):
            if counts[name] < tokens_per_set:
                pools[name].append(sample)
                counts[name] += n
        if min(counts.values()) >= tokens_per_set:
            break
    tokens = min(min(counts.values()), tokens_per_set)
    if tokens == 0:
        empty = [name for name in SETS if counts[name] == 0]
        raise ValueError(f"the data gives no trained token to the set(s) {empty} (text: samples without a vision "
                         "token, mm: samples with one): the analysis needs both kinds of sample")
    if tokens < tokens_per_set:
        logger.warning(f"the data holds fewer targets than tokens_per_set={tokens_per_set} for some set {counts}: "
                       f"every set uses {tokens}")
    return SampleSets({name: take_tokens(pools[name], tokens) for name in SETS}, tokens)


def training_documents(data_args: DataArguments, builder, vocab: CodeVocab) -> list[ds.RenderedSample]:
    """Data epoch 0 as training builds it (`uni_arch.train.builders.build_train_dataset`: the run's sources,
    mixture, per-occurrence draws and packing), cut back into its documents: whole samples, or the pieces of a long
    text sample that packing split, as training saw them."""
    from uni_arch.train.builders import build_train_dataset

    one_epoch = SimpleNamespace(max_steps=0, num_train_epochs=1.0, per_device_train_batch_size=1,
                                gradient_accumulation_steps=1, world_size=1, dataloader_num_workers=0)
    dataset = build_train_dataset(replace(data_args, streaming_data=0), one_epoch, builder, vocab)
    docs = []
    for row in dataset.rows:
        ids, labels, start = np.asarray(row["input_ids"]), np.asarray(row["labels"]), 0
        for n, sample_id in zip(row["doc_lens"], row["sample_ids"]):
            docs.append(ds.RenderedSample(sample_id, ids[start : start + n], labels[start : start + n], []))
            start += n
    return docs


def analysis_documents(data_args: DataArguments, builder, vocab: CodeVocab, seed: int) -> list[ds.RenderedSample]:
    """`training_documents` in a random order (``seed``): the walk `select_sets` takes."""
    docs = training_documents(data_args, builder, vocab)
    random.Random(seed).shuffle(docs)
    return docs


def packed_rows(samples: Sequence[ds.RenderedSample], seq_len: int) -> list[dict[str, Any]]:
    """Whole samples packed into rows of ``seq_len`` tokens (wider for a longer sample: a split would mask a target
    at the cut and change the set's token count)."""
    capacity = max(seq_len, max(len(s.input_ids) for s in samples))
    return ds.rows_from_samples(samples, capacity, 2, "drop")


# ---------------------------------------------------------------------------------------- gradients
def set_gradient(model, rows: Sequence[dict[str, Any]], vocab: CodeVocab, params: Mapping[str, torch.nn.Parameter],
                 total_targets: int, state, desc: str = "gradient") -> dict[str, torch.Tensor]:
    """Gradient of the set's mean token loss for ``params``: this rank's share of ``rows``, summed over ranks.

    Every rank all-reduces every parameter in the same order, also one that got no row or no gradient, so no rank
    waits for another.
    """
    collator = UniDataCollator(0, 2, max(len(r["input_ids"]) for r in rows))
    for p in params.values():
        p.grad = None
    device = state.device
    mine = rows[state.process_index :: state.num_processes]
    for row in tqdm(mine, desc=desc, mininterval=5, disable=not state.is_main_process):
        batch = collator([row])
        labels = batch.pop("labels").to(device)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k not in META_KEYS}
        # use_cache=False: a cache over a packed row is refused by the model (DESIGN.md section 9)
        logits = model(**inputs, use_cache=False).logits
        loss = modality_losses(logits, labels, vocab)["loss_sum"] / total_targets
        loss.backward()
    grads = {}
    for name, p in params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if state.num_processes > 1:
            torch.distributed.all_reduce(g)
        grads[name] = g.detach()
        p.grad = None
    return grads


def cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Cosine of two flattened gradients, in float64; None (N/A) when either is the zero vector."""
    x64, y64 = x.detach().flatten().double(), y.detach().flatten().double()
    nx, ny = x64.norm(), y64.norm()
    if nx == 0 or ny == 0:
        return None
    return float(torch.dot(x64, y64) / (nx * ny))


def _norm(x: torch.Tensor) -> float:
    return float(x.detach().double().norm())


def text_mm_stats(targets: Sequence[Target], g_text: Mapping[str, torch.Tensor],
                  g_mm: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float | None]]:
    """Per target: both norms, cos(g_text, g_mm) and, for a vision weight, cos_branch (module docstring)."""
    out = {}
    for t in targets:
        stats = {"norm_text": _norm(g_text[t.param]), "norm_mm": _norm(g_mm[t.param]),
                 "cos_text_mm": cosine(g_text[t.param], g_mm[t.param]), "cos_branch": None}
        if t.counterpart is not None:
            stats["cos_branch"] = cosine(g_mm[t.param], g_text[t.counterpart])
        out[t.param] = stats
    return out


def ab_stats(targets: Sequence[Target], g_a: Mapping[str, torch.Tensor],
             g_b: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float | None]]:
    """Per target: both norms and the noise baseline cos(g_A, g_B)."""
    return {t.param: {"norm_a": _norm(g_a[t.param]), "norm_b": _norm(g_b[t.param]),
                      "cos_a_b": cosine(g_a[t.param], g_b[t.param])} for t in targets}


def conflict_rows(targets: Sequence[Target], *stats: Mapping[str, Mapping[str, float | None]]) -> list[dict[str, Any]]:
    """One row per target: its description, the merged statistics, similarity and conflict (None = N/A)."""
    rows = []
    for t in targets:
        row: dict[str, Any] = asdict(t)
        for part in stats:
            row.update(part[t.param])
        defined = row["cos_text_mm"] is not None and row["cos_a_b"] is not None
        row["similarity"] = row["cos_text_mm"] - row["cos_a_b"] if defined else None
        row["conflict"] = -row["similarity"] if defined else None
        rows.append(row)
    return rows


def compare(targets: Sequence[Target], grads: Mapping[str, Mapping[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """`conflict_rows` from the four sets' gradients at once (``grads[set][param]``)."""
    return conflict_rows(targets, text_mm_stats(targets, grads["text"], grads["mm"]),
                         ab_stats(targets, grads["a"], grads["b"]))


def per_layer(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean conflict over the weight types of each layer, on the weights text tokens pass through (shared or text
    branch); ``defined`` counts the weights that entered the mean."""
    out = []
    for layer in sorted({r["layer"] for r in rows}):
        mine = [r for r in rows if r["layer"] == layer and r["branch"] in ("shared", "text")]
        values = [r["conflict"] for r in mine if r["conflict"] is not None]
        out.append({"layer": layer, "kind": mine[0]["kind"], "branch": mine[0]["branch"],
                    "mean_conflict": sum(values) / len(values) if values else None, "defined": len(values)})
    return out


# -------------------------------------------------------------------------------------- checkpoints
def checkpoint_step(directory: Path) -> int | None:
    """The global step of a checkpoint (``trainer_state.json``, else the ``checkpoint-N`` name), None if unknown."""
    state = directory / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{state}: no readable global_step ({type(e).__name__}: {e})") from e
    match = re.fullmatch(r"checkpoint-(\d+)", directory.name)
    return int(match.group(1)) if match else None


def find_checkpoints(path: str | Path) -> list[Path]:
    """``path`` itself if it is a checkpoint, and every ``checkpoint-*`` under it, by step; the final model of a
    run is skipped when a ``checkpoint-N`` of the same step is analysed (the same weights twice)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model_name_or_path={str(path)!r} is not a directory")
    found = [d for d in root.glob("checkpoint-*") if (d / "config.json").is_file()]
    found.sort(key=lambda d: (checkpoint_step(d) is None, checkpoint_step(d) or 0, d.name))
    if (root / "config.json").is_file():
        steps = {checkpoint_step(d) for d in found}
        if checkpoint_step(root) is None or checkpoint_step(root) not in steps:
            found.append(root)
    if not found:
        raise FileNotFoundError(f"{root}: neither a checkpoint (config.json) nor a run directory with checkpoint-*/")
    return found


def data_arguments(checkpoint: Path, data_path: str | None) -> DataArguments:
    """The run's data arguments (``run_args.json``: sources, weights, t2i ratio, chat format, packing, ...), with
    ``data_path`` overriding its sources."""
    recorded = read_run_args(checkpoint).get("data", {})
    known = {f.name for f in fields(DataArguments)}
    values = {k: v for k, v in recorded.items() if k in known}
    if data_path:
        values["data_path"] = data_path
    elif "data_path" not in values:
        raise ValueError(f"{checkpoint}: no run_args.json (here or in the run directory above) records the training "
                         "data (a run writes it when it finishes): pass --data_path")
    if not recorded:
        logger.warning(f"{checkpoint}: no run_args.json: samples are rendered with DataArguments' defaults "
                       "(t2i_ratio, cfg_dropout, ...), which may not be the run's")
    return DataArguments(**values)


def load_tokenizer(checkpoint: Path, code_vocab: CodeVocab):
    """The checkpoint's own text tokenizer (the Trainer saves it), else the run's ``tokenizer_path``; it must give
    the model's code vocabulary (image ids start at ``len(tokenizer)``)."""
    from data_process.text_tokenizer import load_text_tokenizer

    source = checkpoint if (checkpoint / "tokenizer_config.json").is_file() else \
        read_run_args(checkpoint).get("model", {}).get("tokenizer_path")
    if not source:
        raise ValueError(f"{checkpoint}: no tokenizer saved with the checkpoint and no run_args.json naming one")
    tokenizer = load_text_tokenizer(source)
    if len(tokenizer) != code_vocab.image_offset:
        raise ValueError(f"{checkpoint}: the tokenizer {source} has {len(tokenizer)} ids but the model's image codes "
                         f"start at image_offset={code_vocab.image_offset}: not this model's tokenizer")
    return tokenizer


def load_model(checkpoint: Path, device):
    """The checkpoint in float32, eval mode, on the training attention path (packed rows, per-document)."""
    from transformers import AutoModelForCausalLM

    import modeling

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), attn_implementation=modeling.PACKED_ATTENTION,
                                                 dtype=torch.float32)
    if not hasattr(model.config, "layer_kinds"):
        raise ValueError(f"{checkpoint} is a {model.config.model_type!r} checkpoint without layer_kinds: convert it "
                         "with modeling/conversion.py first")
    return model.to(device).eval()


def analyze_checkpoint(checkpoint: Path, data_args: DataArguments, tokens_per_set: int, seq_len: int, seed: int,
                       state) -> dict[str, Any]:
    """Select the sets, compute their gradients and compare them (module docstring); returns the json result."""
    from uni_arch.train.builders import build_sample_builder

    model = load_model(checkpoint, state.device)
    vocab = model.config.code_vocab
    builder = build_sample_builder(data_args, load_tokenizer(checkpoint, vocab), vocab)
    sets = select_sets(analysis_documents(data_args, builder, vocab, seed), vocab, tokens_per_set)
    targets = analysis_targets(model)
    wanted = {t.param for t in targets}
    for name, p in model.named_parameters():  # only the compared weights: no embedding/head gradients to compute
        p.requires_grad_(name in wanted)
    params = {name: p for name, p in model.named_parameters() if name in wanted}

    def gradient(name: str) -> dict[str, torch.Tensor]:
        rows = packed_rows(sets.sets[name], seq_len)
        return set_gradient(model, rows, vocab, params, sets.tokens, state, f"{checkpoint.name}: {name}")

    g_text, g_mm = gradient("text"), gradient("mm")
    first = text_mm_stats(targets, g_text, g_mm)
    del g_text, g_mm  # at most two sets of gradients in memory
    g_a, g_b = gradient("a"), gradient("b")
    result_rows = conflict_rows(targets, first, ab_stats(targets, g_a, g_b))
    step = checkpoint_step(checkpoint)
    for row in result_rows:
        row.update(checkpoint=checkpoint.name, step=step, variant=model.config.variant)
    return {"checkpoint": checkpoint.name, "path": str(checkpoint.resolve()), "step": step,
            "variant": model.config.variant, "layer_kinds": list(model.config.layer_kinds),
            "tokens_per_set": sets.tokens, "sets": sets.describe(vocab),
            "rows": [{k: row[k] for k in ROW_FIELDS} for row in result_rows], "per_layer": per_layer(result_rows)}


# ------------------------------------------------------------------------------------------ outputs
def _cell(value: Any) -> Any:
    return NA if value is None else value


def rows_csv(results: Sequence[dict[str, Any]]) -> str:
    """Every checkpoint's rows as csv text (``N/A`` where undefined)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        for row in result["rows"]:
            writer.writerow({k: _cell(row[k]) for k in ROW_FIELDS})
    return buffer.getvalue()


def _json(obj: Any) -> str:
    """JSON with null for N/A; a non-finite float (a diverged checkpoint) is an error, not an invalid file."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def log_table(result: dict[str, Any]) -> None:
    """The per-layer conflict table of one checkpoint (weights text tokens pass through)."""
    by_key = {(r["layer"], r["weight"]): r for r in result["rows"] if r["branch"] in ("shared", "text")}
    lines = [f"{'layer':>5} {'kind':<9} {'branch':<6} {'mean':>8} " + " ".join(f"{w:>7}" for w in WEIGHT_TYPES)]
    for entry in result["per_layer"]:
        cells = [by_key[(entry["layer"], w)]["conflict"] for w in WEIGHT_TYPES]
        fmt = lambda v: f"{v:+.4f}" if v is not None else NA  # noqa: E731
        lines.append(f"{entry['layer']:>5} {entry['kind']:<9} {entry['branch']:<6} {fmt(entry['mean_conflict']):>8} "
                     + " ".join(f"{fmt(c):>7}" for c in cells))
    logger.info(f"{result['checkpoint']} ({result['variant']}, {result['tokens_per_set']} tokens a set): conflict "
                f"= -(cos(g_text, g_mm) - cos(g_A, g_B))\n" + "\n".join(lines))


def main(model_name_or_path: str, output_dir: str, data_path: str | None = None, tokens_per_set: int = 12288,
         seq_len: int | None = None, seed: int = 0, cpu: bool = False,
         threads: int | None = None) -> str:
    """Analyse a checkpoint, or every checkpoint of a run directory; returns the csv path.

    Args:
        model_name_or_path: a checkpoint directory, or a run directory holding ``checkpoint-*/``.
        output_dir: where the csv, the json and one json per checkpoint go.
        data_path: records to draw the sets from (default: the run's training ``data_path``; same syntax), rendered
            with the run's data arguments (draws of its ``shuffle_seed``).
        tokens_per_set: trained targets in each of the four sets.
        seq_len: packed-row length of the forward passes (default: the run's ``model_max_length``); memory only.
        seed: which documents enter the sets, and the split into halves A and B.
        cpu: run on CPU even with a GPU (several CPU ranks then use gloo).
        threads: torch threads per process (default: torch's).
    """
    from accelerate import PartialState

    if isinstance(cpu, str) and cpu.lower() in ("true", "false", "1", "0"):  # fire passes `--cpu true` as a string
        cpu = cpu.lower() in ("true", "1")
    if not isinstance(cpu, bool):
        raise ValueError(f"cpu={cpu!r}: give --cpu (true) or --nocpu (false)")
    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    setup_logging(state.process_index)
    if threads:
        torch.set_num_threads(threads)
    out = Path(output_dir)
    try:
        results = []
        for checkpoint in find_checkpoints(model_name_or_path):
            data_args = data_arguments(checkpoint, data_path)
            row_len = seq_len or data_args.model_max_length
            settings = {"data": dict(vars(data_args)), "tokens_per_set": tokens_per_set, "seq_len": row_len,
                        "seed": seed, "step": checkpoint_step(checkpoint), "path": str(checkpoint.resolve())}
            done = out / f"{checkpoint.name}.json"
            if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("settings") == settings:
                logger.info(f"{checkpoint}: result with these settings already in {done}; not recomputed")
                result = json.loads(done.read_text(encoding="utf-8"))
            else:
                result = {"settings": settings, **analyze_checkpoint(checkpoint, data_args, tokens_per_set, row_len,
                                                                      seed, state)}
                if state.is_main_process:
                    atomic_write_text(done, _json(result))
            log_table(result)
            results.append(result)
        if state.is_main_process:
            atomic_write_text(out / CSV_NAME, rows_csv(results))
            atomic_write_text(out / JSON_NAME, _json({"model_name_or_path": str(model_name_or_path),
                                                      "world_size": state.num_processes, "checkpoints": results}))
            logger.info(f"wrote {out / CSV_NAME} and {out / JSON_NAME}")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    return str(out / CSV_NAME)


if __name__ == "__main__":
    fire.Fire(main)
