"""Does a checkpoint read its caption? Score held-out image codes under their own, a wrong and no caption.

A falling loss does not show that a text-to-image model reads its prompt (DESIGN.md section 8): a model can learn
the image prior alone. This probe measures conditioning directly. For ``num_images`` held-out single-object
scenes of the shapes world (``ShapesWorld.heldout_scene("colors", k)``: a stream no training scene is drawn
from), it encodes the image with the run's VQ and computes the mean negative log-likelihood per image code
(nats, full-vocabulary softmax as in training) of those codes after three t2i prompts rendered by the training
renderer (``SampleBuilder.t2i_prompt_ids``):

    own      "a photo of a red circle"   (the scene's colour and shape)
    wrong    "a photo of a blue square"  (a different colour AND a different shape)
    uncond   the unconditional (CFG) prompt

A model that reads its caption scores ``own`` clearly below ``wrong`` and ``uncond``; a blind one scores all three
the same. ``wrong - own`` is the figure to watch (the caption's information per code), with its standard error
over the images (paired differences). It is small by nature: colour and shape are a few nats per image spread
over all its codes, most of them background, so also read it times ``codes_per_image``::

    python tools/conditioning_probe.py --checkpoint outputs/shapes-tiny-uni-x
    python tools/conditioning_probe.py --checkpoint /tmp/run --num_images 40 --out probe.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import fire
import torch
from loguru import logger
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_process.schema import atomic_write_text  # noqa: E402
from data_process.shapes import COLORS, SHAPES, Scene, ShapesWorld  # noqa: E402
from uni_arch.log_setup import setup_logging  # noqa: E402

PROMPTS = ("own", "wrong", "uncond")


def photo_caption(color: str, shape: str) -> str:
    """The GenEval ``colors`` phrasing, also one of every single-object scene's training captions."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"a photo of {article} {color} {shape}"


def wrong_caption(scene: Scene) -> str:
    """A caption naming a different colour AND a different shape than the scene's single object."""
    obj = scene.objects[0]
    color = COLORS[(COLORS.index(obj.color) + 1 + scene.index % (len(COLORS) - 1)) % len(COLORS)]
    shape = SHAPES[(SHAPES.index(obj.shape) + 1 + scene.index % (len(SHAPES) - 1)) % len(SHAPES)]
    return photo_caption(color, shape)


def _run_settings(checkpoint: Path) -> dict[str, Any]:
    """The run's data settings (``run_args.json``), so prompts are rendered the way training rendered them."""
    from uni_arch.train.hf_trainer import read_run_args

    return read_run_args(checkpoint)  # an intermediate checkpoint-N/ of a finished run: the run directory's


@torch.no_grad()
def code_nll(model, prompt_ids: list[int], code_ids: list[int]) -> float:
    """Mean NLL (nats) of ``code_ids`` following ``prompt_ids`` (which ends with ``<|vision_start|>``)."""
    ids = torch.tensor([prompt_ids + code_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(code_ids)).item()


def probe(checkpoint: str, num_images: int = 40, image_tokenizer: str | None = None,
          image_tokenizer_path: str | None = None, world_seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Score ``num_images`` held-out single-object scenes under own / wrong / unconditional prompts (module doc)."""
    from transformers import AutoModelForCausalLM

    import modeling  # noqa: F401  registers the toolkit's model types with the Auto classes
    from data_process.text_tokenizer import load_text_tokenizer
    from modeling.vocab import DEFAULT_MAX_GRID, CodeVocab
    from modeling.vq import load_image_tokenizer
    from uni_arch.train.templates import SampleBuilder

    torch.set_num_threads(threads)
    ckpt = Path(checkpoint)
    settings = _run_settings(ckpt)
    model_s, data_s = settings.get("model", {}), settings.get("data", {})
    kind = image_tokenizer or model_s.get("image_tokenizer") or "shapes"
    vq_path = image_tokenizer_path or model_s.get("image_tokenizer_path")
    if not vq_path:
        raise ValueError(f"{ckpt}: no run_args.json names the image tokenizer: pass --image_tokenizer_path")
    vq = load_image_tokenizer(kind, vq_path).eval()
    tokenizer = load_text_tokenizer(str(ckpt))
    size_tags = bool(data_s.get("size_tags", False))
    vocab = CodeVocab.from_tokenizer(tokenizer, vq.level_sizes, max_grid=DEFAULT_MAX_GRID if size_tags else 0)
    extra = {k: data_s[k] for k in ("system_prompt", "template_dir") if data_s.get(k)}
    builder = SampleBuilder(tokenizer, vocab, size_tags=size_tags, **extra)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation="sdpa").eval()

    world = ShapesWorld(seed=world_seed)
    scenes = [world.heldout_scene("colors", k) for k in range(num_images)]
    pixels = vq.preprocess([world.render(s) for s in scenes])
    encoded = vq.encode(pixels)
    scores = torch.zeros(num_images, len(PROMPTS), dtype=torch.float64)
    for i, (scene, codes) in enumerate(tqdm(list(zip(scenes, encoded.codes_BN)), desc="probe", mininterval=5)):
        code_ids = vocab.codes_to_ids(codes.numpy(), encoded.levels_N.numpy()).tolist()
        obj = scene.objects[0]
        prompts = {"own": photo_caption(obj.color, obj.shape), "wrong": wrong_caption(scene), "uncond": None}
        for j, name in enumerate(PROMPTS):
            scores[i, j] = code_nll(model, builder.t2i_prompt_ids(prompts[name], encoded.grid), code_ids)
    result: dict[str, Any] = {name: scores[:, j].mean().item() for j, name in enumerate(PROMPTS)}
    for j, name in ((1, "wrong"), (2, "uncond")):
        gap = scores[:, j] - scores[:, 0]  # paired per image: the images' own difficulty cancels
        result[f"{name}_minus_own"] = gap.mean().item()
        result[f"{name}_minus_own_se"] = (gap.std() / math.sqrt(num_images)).item() if num_images > 1 else float("nan")
    result.update(codes_per_image=len(encoded.levels_N), checkpoint=str(ckpt), num_images=num_images,
                  world_seed=world_seed)
    if not all(math.isfinite(result[p]) for p in PROMPTS):
        raise FloatingPointError(f"{ckpt}: non-finite scores {result}")
    return result


def main(checkpoint: str, num_images: int = 40, out: str | None = None, image_tokenizer: str | None = None,
         image_tokenizer_path: str | None = None, world_seed: int = 0, threads: int = 1,
         min_gap: float | None = None) -> dict[str, Any]:
    """CLI: print (and with ``out``, write atomically) the probe's nats per code. With ``min_gap`` it is a quality
    gate (train.sh's ``CKPT_GATE_CAPTION_GAP``): exit 1 with the figures when ``wrong - own`` summed over an image's
    codes (nats per image) is below it. Per image, not per code: the caption's information is a few nats per image
    whatever the tokenizer, and a per-code bar would be 4x harder to clear for an RQ-VAE's 256 codes than for the
    shapes VQ's 64, 5x for HQ-VAE's 320."""
    setup_logging()
    result = probe(checkpoint, num_images, image_tokenizer, image_tokenizer_path, world_seed, threads)
    logger.info(f"{checkpoint}: nats/code own {result['own']:.4f} wrong {result['wrong']:.4f} uncond "
                f"{result['uncond']:.4f} (wrong-own {result['wrong_minus_own']:+.4f} +- {result['wrong_minus_own_se']:.4f}, "
                f"uncond-own {result['uncond_minus_own']:+.4f} +- {result['uncond_minus_own_se']:.4f} s.e.) over "
                f"{num_images} held-out single-object images")
    if out:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    per_image = result["wrong_minus_own"] * result["codes_per_image"]
    if min_gap is not None and per_image < min_gap:
        raise SystemExit(f"{checkpoint}: the model barely reads its caption: a wrong caption costs {per_image:+.3f} "
                         f"nats per image ({result['wrong_minus_own']:+.4f} per code x {result['codes_per_image']} "
                         f"codes; the gate: >= {min_gap}; a blind model scores ~0). Check the learning rate, the "
                         "text-to-image share and all_modal_visible.")
    return result


if __name__ == "__main__":
    fire.Fire(main)
