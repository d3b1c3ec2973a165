"""The experiments ``python evaluation/eval_template.py`` evaluates: edit ``EXPERIMENTS`` (the reference's format).

Each experiment is a dict: ``name``, ``model_path`` (a checkpoint folder this toolkit saved), ``eval_type`` (a list
of benchmark names: ``shapes``, ``shapes_vqa``, ``text``, ``geneval``, ``dpg_bench``, ``vis_und``; see
``evaluation/benchmarks/__init__.py``) and the settings of those benchmarks; every key is a field of
:class:`Experiment` below (defaults and meaning there). Unknown keys, and paths that a listed benchmark needs but
that do not exist, are errors naming the experiment and the key, raised before anything runs. Any key can also be
given on the command line for the experiments selected (``--model_path DIR --geneval_prompts_path FILE``).

The default list holds one experiment: the shapes-world checkpoint that ``bash train.sh`` leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

# ================================================================================================ the list
EXPERIMENTS: list[dict[str, Any]] = [
    {
        "name": "shapes-tiny-uni-x",
        "model_path": "outputs/shapes-tiny-uni-x",
        # --- Shapes world (the embedded default): GenEval suite + references, VQA, local text task ---
        "shapes_world": "data/shapes",
        "cfg": 4.0,
        "seed": 0,
        "t2i_devices": ["cpu"],
        # --- Visual understanding server ---
        "vis_und_server_devices": ["cpu"],
        "vis_und_max_batch_size": 32,
        "vis_und_api_nproc": 16,
        "vis_und_max_tokens": 10,
        "eval_type": ["shapes", "shapes_vqa", "text"],
    },
    # A real checkpoint on the public benchmarks (paths are examples: download the files, then uncomment):
    # {
    #     "name": "uni-x-qwen2.5-1.5b-sft",
    #     "model_path": "outputs/uni-x-1.5b-sft",
    #     # --- Text-to-image ---
    #     "geneval_prompts_path": "data/eval/geneval/evaluation_metadata.jsonl",   # djghosh13/geneval prompts/
    #     "geneval_detector_path": "data/eval/models/mask2former-swin-s-coco-instance",
    #     "geneval_clip_path": "data/eval/models/clip-vit-large-patch14",
    #     "dpg_bench_prompts_path": "data/eval/dpg_bench/prompts",                   # TencentQQGYLab/ELLA dpg_bench/
    #     "dpg_bench_questions_path": "data/eval/dpg_bench/dpg_bench.csv",
    #     "dpg_bench_judge_url": "http://127.0.0.1:8001/v1",                         # any OpenAI-compatible VQA model
    #     "dpg_bench_judge_model": "mplug-large",
    #     "cfg": 4.0,
    #     "t2i_devices": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"],                   # one generating process each
    #     "t2i_batch_prompts": 16,
    #     # --- Visual understanding (VLMEvalKit TSVs) ---
    #     "vis_und_data": {"mme": "data/eval/vlmeval/MME.tsv", "pope": "data/eval/vlmeval/POPE.tsv",
    #                      "mmbench": "data/eval/vlmeval/MMBench_DEV_EN.tsv"},
    #     "vis_und_server_devices": ["cuda:4", "cuda:5", "cuda:6", "cuda:7"],        # one server each
    #     "vis_und_max_batch_size": 40,
    #     "vis_und_api_nproc": 256,
    #     "vis_und_max_tokens": 10,
    #     # --- Text (lm-eval; these need the Hub's datasets or a local cache) ---
    #     "text_tasks": ["mmlu", "arc_easy", "arc_challenge", "boolq", "winogrande"],
    #     "eval_type": ["geneval", "dpg_bench", "vis_und", "text"],
    # },
]


# ============================================================================================ the schema
TRAIN_HINT = "`bash train.sh` makes the default shapes checkpoint and world"
# How text-to-image benchmarks seed their images (evaluation/benchmarks/runners.t2i_generate_fn); p is the prompt's
# line in GenEval-style metadata, or dpg_bench.prompt_number(item id) for DPG-Bench.
SEEDS_RULE = "image i of prompt number p: seed + p * n + i (n images per prompt)"


class ExperimentError(ValueError):
    """A bad experiment; the message names the experiment and the key."""


@dataclass
class Experiment:
    """One experiment of ``EXPERIMENTS``; paths are as given (relative to the directory the command runs in)."""

    name: str
    model_path: str
    eval_type: list[str]
    # text-to-image (geneval, dpg_bench, shapes): CFG, sampling and seeds; image i of every prompt uses seed + i
    cfg: float = 4.0
    seed: int = 0
    t2i_sampling: dict[str, Any] = field(default_factory=dict)  # SamplingSettings fields over IMAGE_DEFAULTS
    t2i_devices: list[str] = field(default_factory=lambda: ["cpu"])  # one generating process per device
    t2i_batch_prompts: int = 8  # prompts per generate call (x n_samples images, each with its CFG twin row)
    n_samples: int = 4  # images per GenEval / shapes prompt (DPG-Bench always draws its 2x2 grid)
    # geneval
    geneval_prompts_path: str | None = None  # evaluation_metadata.jsonl
    geneval_detector_path: str | None = None  # Mask2Former COCO instance checkpoint folder
    geneval_clip_path: str | None = None  # CLIP ViT-L/14 folder
    # dpg_bench
    dpg_bench_prompts_path: str | None = None  # the prompts folder
    dpg_bench_questions_path: str | None = None  # dpg_bench.csv
    dpg_bench_judge_url: str | None = None  # OpenAI-compatible VQA judge; None: this experiment's own server
    dpg_bench_judge_model: str | None = None
    # vis_und and shapes_vqa: the server and its clients
    vis_und_data: dict[str, str] = field(default_factory=dict)  # mme / pope / mmbench -> VLMEvalKit TSV
    vis_und_server_devices: list[str] = field(default_factory=lambda: ["cpu"])  # one server per device
    vis_und_max_batch_size: int = 32  # the server's max_batch_rows
    vis_und_api_nproc: int = 16  # parallel client requests
    vis_und_max_tokens: int = 10
    vis_und_threads: int | None = None  # torch threads per server (default: torch's)
    # text (lm-eval)
    text_tasks: list[str] = field(default_factory=lambda: ["shapes_facts"])
    text_num_fewshot: int | None = None
    text_batch_size: int = 1
    # shapes (the embedded default)
    shapes_world: str = "data/shapes"  # a built shapes world (its world.json)
    shapes_per_tag: int = 16  # held-out GenEval prompts per tag
    shapes_unseen_per_pair: int = 4  # extra ``colors`` prompts per held-out (colour, shape) pair, if the world has any
    shapes_vqa_seed: int = 1  # the world seed of the VQA scenes (not the training world's)
    shapes_vqa_scenes: int = 64  # scenes of the VQA set (3-4 questions each)

    # ------------------------------------------------------------------------------------------ checks
    def _err(self, key: str, problem: str) -> ExperimentError:
        return ExperimentError(f"experiment {self.name!r}: {key}: {problem}")

    def validate(self, known_benchmarks: Sequence[str]) -> "Experiment":
        """Types, values and the paths the listed benchmarks need (errors name the experiment and the key)."""
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise self._err("name", f"must be a non-empty folder name, got {self.name!r}")
        if not isinstance(self.eval_type, list) or not self.eval_type:
            raise self._err("eval_type", f"must be a non-empty list of benchmark names, got {self.eval_type!r}")
        for t in self.eval_type:
            if t not in known_benchmarks:
                raise self._err("eval_type", f"unknown benchmark {t!r}; known: {', '.join(known_benchmarks)}")
        minimum = {"seed": 0, "shapes_vqa_seed": 0, "shapes_unseen_per_pair": 0, "t2i_batch_prompts": 1,
                   "n_samples": 1, "vis_und_max_batch_size": 1, "vis_und_api_nproc": 1, "vis_und_max_tokens": 1,
                   "text_batch_size": 1, "shapes_per_tag": 1, "shapes_vqa_scenes": 1}
        for key, low in minimum.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise self._err(key, f"must be an integer >= {low}, got {value!r}")
        if not isinstance(self.cfg, (int, float)) or isinstance(self.cfg, bool) or self.cfg < 0:
            raise self._err("cfg", f"must be a number >= 0 (1 = no guidance), got {self.cfg!r}")
        for key in ("t2i_devices", "vis_und_server_devices"):
            value = getattr(self, key)
            if not isinstance(value, list) or not value or not all(isinstance(d, str) and d for d in value):
                raise self._err(key, f"must be a non-empty list of devices like 'cpu' or 'cuda:0', got {value!r}")
        self._check_paths()
        self.sampling()  # unknown sampling fields fail here
        return self

    def _need(self, key: str, what: str, kind: str = "file", hint: str = "") -> None:
        value = getattr(self, key)
        if not value:
            raise self._err(key, f"{what} is needed by eval_type {self.eval_type}; set it in evaluation/exp.py or "
                                 f"pass --{key}")
        ok = Path(value).is_dir() if kind == "dir" else Path(value).is_file()
        if not ok:
            raise self._err(key, f"{kind} {value} does not exist ({what}){hint}")

    def _check_paths(self) -> None:
        types = set(self.eval_type)
        self._need("model_path", "the checkpoint", "dir", f"; {TRAIN_HINT}")
        if not (Path(self.model_path) / "config.json").is_file():
            raise self._err("model_path", f"{self.model_path} has no config.json: not a saved checkpoint; "
                                          f"{TRAIN_HINT}")
        if types & {"shapes", "shapes_vqa"}:
            self._need("shapes_world", "the shapes world (its world.json)", "dir", f"; {TRAIN_HINT}")
            world_json = Path(self.shapes_world) / "world.json"
            if not world_json.is_file():
                raise self._err("shapes_world", f"{self.shapes_world} has no world.json; {TRAIN_HINT}")
            if "shapes_vqa" in types and json.loads(world_json.read_text(encoding="utf-8")).get("seed") == \
                    self.shapes_vqa_seed:
                raise self._err("shapes_vqa_seed", f"{self.shapes_vqa_seed} is the seed of the training world "
                                                   f"{world_json}: the VQA scenes must come from another world")
        if "geneval" in types:
            self._need("geneval_prompts_path", "GenEval's evaluation_metadata.jsonl")
            self._need("geneval_detector_path", "a Mask2Former COCO instance checkpoint folder", "dir")
            self._need("geneval_clip_path", "a CLIP ViT-L/14 folder", "dir")
        if "dpg_bench" in types:
            self._need("dpg_bench_prompts_path", "DPG-Bench's prompts folder", "dir")
            self._need("dpg_bench_questions_path", "DPG-Bench's question csv (dpg_bench.csv)")
        if "vis_und" in types:
            from evaluation.benchmarks.vis_und import BENCHMARKS

            if not isinstance(self.vis_und_data, dict) or not self.vis_und_data:
                raise self._err("vis_und_data", f"a dict of benchmark -> TSV ({', '.join(BENCHMARKS)}) is needed by "
                                                f"eval_type vis_und, got {self.vis_und_data!r}")
            for bench, path in self.vis_und_data.items():
                if bench not in BENCHMARKS:
                    raise self._err(f"vis_und_data.{bench}", f"unknown benchmark; known: {', '.join(BENCHMARKS)}")
                if not Path(path).is_file():
                    raise self._err(f"vis_und_data.{bench}", f"file {path} does not exist (VLMEvalKit's TSV)")

    # -------------------------------------------------------------------------------------- settings
    def sampling(self):
        """The image sampling settings (``IMAGE_DEFAULTS`` with ``t2i_sampling`` on top)."""
        from evaluation.sampling import IMAGE_DEFAULTS

        known = {f.name for f in fields(IMAGE_DEFAULTS)}
        unknown = sorted(set(self.t2i_sampling) - known)
        if unknown:
            raise self._err(f"t2i_sampling.{unknown[0]}", f"unknown sampling field; known: {', '.join(sorted(known))}")
        return dataclasses.replace(IMAGE_DEFAULTS, **self.t2i_sampling)

    def t2i_settings(self) -> dict[str, Any]:
        """What every text-to-image result records: checkpoint and its hash, CFG, sampling, seeds."""
        return {"checkpoint": str(Path(self.model_path).resolve()),
                "checkpoint_sha256": checkpoint_hash(self.model_path),
                "cfg_scale": self.cfg, "sampling": dataclasses.asdict(self.sampling()),
                "seed": self.seed, "seeds": SEEDS_RULE, "n_samples": self.n_samples}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=16)
def _hash_cached(path: str, mtime_ns: int, size: int) -> str:
    from modeling.vq.base import file_hash

    return file_hash(path)


def checkpoint_hash(model_path: str | os.PathLike) -> str:
    """Short sha256 of the checkpoint's ``model.safetensors`` (``modeling.vq.base.file_hash``); a sharded checkpoint
    hashes its index file. Cached per file state: every benchmark of a run records it, a 6 GB file is hashed once."""
    folder = Path(model_path)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            st = path.stat()
            return _hash_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)
    raise FileNotFoundError(f"{folder}: no model.safetensors (or index) to hash")


def parse_experiments(raw: Sequence[dict[str, Any]], known_benchmarks: Sequence[str],
                      overrides: dict[str, Any] | None = None, only: Sequence[str] | None = None) -> list[Experiment]:
    """``EXPERIMENTS`` dicts -> validated :class:`Experiment` s: ``only`` selects by name, ``overrides`` replace keys
    of every selected experiment. Unknown keys (in a dict or an override), duplicate names, unknown names in
    ``only`` and missing paths raise :class:`ExperimentError` naming the experiment and the key."""
    known = {f.name for f in fields(Experiment)}
    names = []
    for i, entry in enumerate(raw):
        label = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        if not isinstance(entry, dict):
            raise ExperimentError(f"experiment {label!r}: must be a dict, got {type(entry).__name__}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ExperimentError(f"experiment {label!r}: {unknown[0]}: unknown key; known: {', '.join(sorted(known))}")
        for key in ("name", "model_path", "eval_type"):
            if key not in entry:
                raise ExperimentError(f"experiment {label!r}: {key}: missing (every experiment needs name, "
                                      f"model_path and eval_type)")
        if entry["name"] in names:
            raise ExperimentError(f"experiment {entry['name']!r}: name: listed twice")
        names.append(entry["name"])
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise ExperimentError(f"experiment {missing[0]!r}: name: not in the list; known: {', '.join(names)}")
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - known)
    if bad:
        raise ExperimentError(f"command line: --{bad[0]}: unknown key; known: {', '.join(sorted(known))}")
    out = []
    for entry in raw:
        if only and entry["name"] not in only:
            continue
        out.append(Experiment(**{**entry, **overrides}).validate(known_benchmarks))
    if not out:
        raise ExperimentError("no experiment selected")
    return out
