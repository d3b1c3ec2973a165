"""Talk to a checkpoint from Python or the command line: any-modal chat and text-to-image with batched CFG.

Python::

    from evaluation.uni_infer import any_modal_chat_api
    chat = any_modal_chat_api("outputs/shapes-tiny-uni-x")           # a UniInfer; explicit arguments override
    images = chat.generate_images("a photo of a red circle", num_images=4, seed=0)[0]   # GeneratedImage list
    reply = chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "scene.png"}},
                                               {"type": "text", "text": "What colour is the shape?"}]}])
    reply.text, reply.message    # the message to append to the history (generated images stay as codes)

Command line (fire)::

    python evaluation/uni_infer.py generate --checkpoint DIR --prompt "a photo of a red circle" --num_images 64 \\
        --seed 0 --out dir/                       # PNGs + settings.json (settings, checkpoint, per-image seeds)
    python evaluation/uni_infer.py chat --checkpoint DIR --message "Describe this image." --image scene.png

Prompts are rendered only by the training renderer (``SampleBuilder.t2i_prompt_ids`` / ``chat_prompt_ids`` /
``turns_from_messages``) with the checkpoint's own settings (``uni_x_inference.json``, see
``evaluation.pipeline``); decoding is ``evaluation.sampling.ConstrainedDecoder`` (constraints, CFG in one batched
forward, the KV cache, a generator per sample). Seeds: image ``i`` of every prompt uses ``seed + i``, so any image
is reproduced alone by ``generate_images(prompt, num_images=1, seed=seed + i)``.

Message content parts (OpenAI-style): ``{"type": "text", "text"}``; ``{"type": "image_url", "image_url": {"url"}}``
with a ``data:`` URL, a local path or ``file://`` path (remote URLs are refused: inference is offline);
``{"type": "image", "image": <path | PIL image | data: URL>}``; and ``{"type": "image_gen", "codes", "grid"}``, an
image an assistant turn generated, kept in the context as its codes (never re-encoded). Several images per turn and
several turns are fine. ``draw``: ``"never"`` (text replies only), ``"auto"`` (the model may open an image block),
``"always"`` (the reply starts with an image: text-to-image in a conversation, image editing).
"""

from __future__ import annotations

import base64
import io
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import torch
from loguru import logger

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_process.schema import ImageCodes, atomic_write_text  # noqa: E402
from evaluation.pipeline import Pipeline, load_pipeline  # noqa: E402
from evaluation.sampling import IMAGE_DEFAULTS, TEXT_DEFAULTS, ConstrainedDecoder, RowPlan, SamplingSettings  # noqa: E402
from uni_arch.train.templates import IMAGE_PART_TYPES, turns_from_messages  # noqa: E402

DEFAULT_CFG_SCALE = 4.0  # DESIGN.md section 6 (the reference's setting)
Draw = Literal["never", "auto", "always"]


@dataclass
class GeneratedImage:
    """One generated image: the picture, its codes (the model's own output) and how it was made."""

    image: Any  # PIL.Image.Image, or None without an image tokenizer
    codes: list[int]
    grid: tuple[int, int]
    seed: int
    prompt: str | None = None

    def as_part(self) -> dict[str, Any]:
        """An ``image_gen`` content part: keeps the image in a later turn's context as these codes."""
        return {"type": "image_gen", "codes": list(self.codes), "grid": list(self.grid), "image": self.image}


@dataclass
class ChatReply:
    """A reply: its text and images in order (``parts``), and the raw ids."""

    parts: list[dict[str, Any]]
    ids: list[int]
    images: list[GeneratedImage] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p["text"] for p in self.parts if p["type"] == "text")

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message to append to ``messages`` for the next turn."""
        return {"role": "assistant", "content": self.parts}


class ChatPlans(NamedTuple):
    """Decoder rows for chat replies: ``prefix`` is forced before the reply (``draw="always"``: the image block's
    opening), ``grid`` is the image grid (None when the reply cannot draw), ``cfg_scale`` the guidance in force."""

    plans: list[RowPlan]
    prefix: list[int]
    grid: tuple[int, int] | None
    cfg_scale: float


# ------------------------------------------------------------------------------------------ images in
def per_prompt_seeds(seed: int | Sequence[int], num_prompts: int) -> list[int]:
    """The base seed of each prompt: one int for all (image ``i`` of every prompt seeded ``seed + i``, so one
    prompt's images do not depend on the others in the call), or one per prompt."""
    if isinstance(seed, int):
        return [seed] * num_prompts
    bases = [int(s) for s in seed]
    if len(bases) != num_prompts:
        raise ValueError(f"seed lists {len(bases)} bases for {num_prompts} prompts")
    return bases


def open_image(value: Any, where: str):
    """A PIL image from a PIL image, a ``data:`` URL, a ``file://`` URL or a local path (remote URLs refused)."""
    from modeling.vq.preprocess import decode_image, to_rgb

    if hasattr(value, "convert"):
        return to_rgb(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: an image must be a PIL image, a data: URL or a local path, got {type(value).__name__}")
    if value.startswith("data:"):
        try:
            header, payload = value.split(",", 1)
            data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else payload.encode()
        except (ValueError, base64.binascii.Error) as e:
            raise ValueError(f"{where}: malformed data: URL ({e})") from e
    elif value.startswith(("http://", "https://")):
        raise ValueError(f"{where}: remote image URLs are not fetched (offline); pass a data: URL or a local path")
    else:
        path = Path(value.removeprefix("file://"))
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} not found")
        data = path.read_bytes()
    try:
        return decode_image(data)
    except Exception as e:  # Pillow reports bad files with several exception types
        raise ValueError(f"{where}: not a decodable image ({type(e).__name__}: {e})") from e


def _image_part_value(part: dict[str, Any]) -> Any:
    if part["type"] == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return part.get("image")


# ---------------------------------------------------------------------------------------- the class
class UniInfer:
    """A loaded checkpoint (model, text tokenizer, image tokenizer, renderer) that chats and draws."""

    def __init__(self, pipeline: Pipeline):
        self.pipe = pipeline
        tok = pipeline.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else pipeline.builder.document_eos_id
        stops = [pipeline.builder.document_eos_id]
        if pipeline.builder.answer_end_id is not None:
            stops.append(pipeline.builder.answer_end_id)
        self.stop_ids = stops

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, **overrides: Any) -> "UniInfer":
        return cls(load_pipeline(checkpoint, **overrides))

    # --------------------------------------------------------------------------------- helpers
    def decoder(self, grid: tuple[int, int] | None = None) -> ConstrainedDecoder:
        grid = self.pipe.resolve_grid(grid)
        return ConstrainedDecoder(self.pipe.model, self.pipe.code_vocab, self.pipe.levels(grid),
                                  self.pipe.builder.size_tag_ids_for(grid), self.stop_ids, self.pad_id)

    def decode_codes(self, codes_list: Sequence[Sequence[int]], grid: tuple[int, int]) -> list[Any]:
        """Codes -> PIL images (None each without an image tokenizer)."""
        if self.pipe.image_tokenizer is None or not codes_list:
            return [None] * len(codes_list)
        from PIL import Image

        from modeling.vq.shapes_vq import pixels_to_uint8

        codes_BN = torch.tensor([list(c) for c in codes_list], dtype=torch.long, device=self.pipe.device)
        pixels = pixels_to_uint8(self.pipe.image_tokenizer.decode(codes_BN, grid).float().cpu())
        return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]

    def _codes_of(self, ids: Sequence[int]) -> list[int]:
        codes, _ = self.pipe.code_vocab.ids_to_codes([i for i in ids if self.pipe.code_vocab.is_image_id(i)])
        return codes.tolist()

    def encode_image(self, image: Any, where: str) -> ImageCodes:
        vq = self.pipe.image_tokenizer
        if vq is None:
            raise ValueError(f"{where}: this checkpoint records no image tokenizer: pass image_tokenizer_path")
        pil = open_image(image, where)
        enc = vq.encode(vq.preprocess([pil]).to(self.pipe.device))
        return ImageCodes(enc.codes_BN[0].tolist(), tuple(enc.grid), vq.tokenizer_id, enc.levels_N.tolist())

    def prompt_ids(self, messages: list[dict[str, Any]], where: str = "messages") -> list[int]:
        """OpenAI-style messages -> the training renderer's ids for a reply (images encoded or taken as codes)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where} must be a non-empty list of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"{where}[{i}] must be a message object with role and content, got "
                                 f"{type(message).__name__}")
        images: list[ImageCodes] = []
        for i, message in enumerate(messages):
            content = message.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                if not isinstance(part, dict) or part.get("type") not in IMAGE_PART_TYPES:
                    continue
                at = f"{where}[{i}].content[{j}]"
                if part["type"] == "image_gen":
                    if "codes" not in part or "grid" not in part:
                        raise ValueError(f"{at}: an image_gen part needs codes and grid")
                    grid = tuple(part["grid"])
                    levels = part.get("levels") or self.pipe.levels(grid)
                    images.append(ImageCodes(list(part["codes"]), grid, "generated", list(levels)))
                else:
                    images.append(self.encode_image(_image_part_value(part), at))
        turns = turns_from_messages(messages, self.pipe.builder.format.image_placeholder)
        return self.pipe.builder.chat_prompt_ids(turns, images)

    # ------------------------------------------------------------------------------ text-to-image
    def generate_images(self, prompts: str | None | Sequence[str | None], num_images: int = 1, *,
                        seed: int | Sequence[int] = 0,
                        grid: tuple[int, int] | None = None, cfg_scale: float = DEFAULT_CFG_SCALE,
                        sampling: SamplingSettings = IMAGE_DEFAULTS, batch_size: int | None = None,
                        use_cache: bool = True) -> list[list[GeneratedImage]]:
        """``num_images`` images per prompt (image ``i`` seeded ``seed + i``; ``seed`` may also list one base per
        prompt, as benchmarks do so that two prompts with the same text get different images), ``batch_size`` samples
        per forward (default: all at once; each sample adds a CFG twin row). A prompt of None is the unconditional
        prompt (the CFG twin's; guidance leaves it unchanged). Returns one list per prompt."""
        prompts = [prompts] if prompts is None or isinstance(prompts, str) else list(prompts)
        if num_images < 1 or not prompts:
            raise ValueError(f"need at least one prompt and num_images >= 1, got {len(prompts)}, {num_images}")
        grid = self.pipe.resolve_grid(grid)
        bases = per_prompt_seeds(seed, len(prompts))
        plans = self.t2i_plans(prompts, num_images, seed=bases, grid=grid, cfg_scale=cfg_scale)
        decoder = self.decoder(grid)
        n = len(self.pipe.levels(grid))
        step = batch_size or len(plans)
        codes: list[list[int]] = []
        for start in range(0, len(plans), step):
            outs = decoder.run(plans[start:start + step], TEXT_DEFAULTS, sampling, cfg_scale, n, use_cache)
            codes += [self._codes_of(o) for o in outs]
        pictures = self.decode_codes(codes, grid)
        results: list[list[GeneratedImage]] = [[] for _ in prompts]
        for k, (c, pic) in enumerate(zip(codes, pictures)):
            j, i = divmod(k, num_images)
            results[j].append(GeneratedImage(pic, c, grid, bases[j] + i, prompts[j]))
        return results

    # ------------------------------------------------------------------------------------- chat
    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]], *, draw: Draw = "never",
             max_new_tokens: int = 256, seed: int = 0, text_sampling: SamplingSettings = TEXT_DEFAULTS,
             image_sampling: SamplingSettings = IMAGE_DEFAULTS, cfg_scale: float = DEFAULT_CFG_SCALE,
             grid: tuple[int, int] | None = None) -> ChatReply | list[ChatReply]:
        """Reply to one conversation (a list of messages) or to many at once (a list of them; conversation ``i``
        seeded ``seed + i``). Generated images come back as parts (``image_gen``, with the picture and codes)."""
        if draw not in ("never", "auto", "always"):
            raise ValueError(f"draw={draw!r} must be never, auto or always")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        prompts = [self.prompt_ids(conv, f"messages[{c}]") for c, conv in enumerate(conversations)]
        planned = self.chat_plans(prompts, draw=draw, seed=seed, cfg_scale=cfg_scale, grid=grid)
        decoder = self.decoder(planned.grid) if planned.grid is not None else ConstrainedDecoder(
            self.pipe.model, self.pipe.code_vocab, [0], [], self.stop_ids, self.pad_id)
        outs = decoder.run(planned.plans, text_sampling, image_sampling, planned.cfg_scale, max_new_tokens)
        replies = [self.reply_from_ids(planned.prefix + out, planned.grid, seed + c) for c, out in enumerate(outs)]
        return replies[0] if single else replies

    __call__ = chat

    # --------------------------------------------------------------- rows for a decoder (also the server's)
    def t2i_plans(self, prompts: Sequence[str | None], num_images: int = 1, *, seed: int | Sequence[int] = 0,
                  grid: tuple[int, int] | None = None, cfg_scale: float = DEFAULT_CFG_SCALE) -> list[RowPlan]:
        """Decoder rows for text-to-image: ``num_images`` per prompt, image ``i`` seeded ``seed + i`` (or
        ``seed[j] + i`` for prompt ``j``), each with the unconditional twin when ``cfg_scale != 1``.
        ``generate_images`` and the HTTP server build rows here."""
        grid = self.pipe.resolve_grid(grid)
        builder = self.pipe.builder
        uncond = builder.t2i_prompt_ids(None, grid) if cfg_scale != 1.0 else None
        bases = per_prompt_seeds(seed, len(prompts))
        return [RowPlan(builder.t2i_prompt_ids(p, grid), base + i, start_in_image=True, stop_after_image=True,
                        uncond_prompt=uncond) for p, base in zip(prompts, bases) for i in range(num_images)]

    def chat_plans(self, prompts: Sequence[list[int]], *, draw: Draw = "never", seed: int = 0,
                   cfg_scale: float = DEFAULT_CFG_SCALE, grid: tuple[int, int] | None = None) -> "ChatPlans":
        """Decoder rows for replies to rendered conversations (``prompt_ids``), row ``c`` seeded ``seed + c``;
        ``draw`` as in :meth:`chat`. ``chat`` and the HTTP server build rows here."""
        if draw not in ("never", "auto", "always"):
            raise ValueError(f"draw={draw!r} must be never, auto or always")
        builder, vocab = self.pipe.builder, self.pipe.code_vocab
        grid = self.pipe.resolve_grid(grid) if draw != "never" else None
        prefix = [vocab.vision_start_id] + builder.size_tag_ids_for(grid) if draw == "always" else []
        twin = None
        if draw != "never" and cfg_scale != 1.0:
            full = builder.t2i_prompt_ids(None, grid)
            twin = full if draw == "always" else full[: len(full) - 1 - len(builder.size_tag_ids_for(grid))]
        plans = [RowPlan(list(p) + prefix, seed + c, start_in_image=draw == "always", allow_draw=draw != "never",
                         uncond_prompt=twin) for c, p in enumerate(prompts)]
        return ChatPlans(plans, prefix, grid, cfg_scale if twin else 1.0)

    def reply_from_ids(self, ids: list[int], grid: tuple[int, int] | None, seed: int) -> ChatReply:
        """Split generated ids into text parts and image parts (complete blocks decode to pictures)."""
        vocab, tok = self.pipe.code_vocab, self.pipe.tokenizer
        parts: list[dict[str, Any]] = []
        images: list[GeneratedImage] = []
        text: list[int] = []
        i = 0
        while i < len(ids):
            t = ids[i]
            if t == vocab.vision_start_id:
                if text:
                    parts.append({"type": "text", "text": tok.decode(text)})
                    text = []
                end = ids.index(vocab.vision_end_id, i) if vocab.vision_end_id in ids[i:] else len(ids)
                codes = self._codes_of(ids[i + 1:end])
                if grid is not None and len(codes) == len(self.pipe.levels(grid)):  # a complete block
                    image = GeneratedImage(self.decode_codes([codes], grid)[0], codes, grid, seed)
                    images.append(image)
                    parts.append(image.as_part())
                i = end + 1
                continue
            if t not in self.stop_ids:
                text.append(t)
            i += 1
        if text:
            parts.append({"type": "text", "text": tok.decode(text)})
        return ChatReply(parts, list(ids), images)


def any_modal_chat_api(checkpoint: str | Path | Pipeline, **overrides: Any) -> UniInfer:
    """The reference's entry point, kept by name: a ready :class:`UniInfer` for a checkpoint directory (or an
    already loaded :class:`~evaluation.pipeline.Pipeline`); call it with messages to chat, or use
    ``generate_images``."""
    if isinstance(checkpoint, Pipeline):
        if overrides:
            raise TypeError("overrides apply when loading: pass a checkpoint path, not a Pipeline")
        return UniInfer(checkpoint)
    return UniInfer.from_checkpoint(checkpoint, **overrides)


# ------------------------------------------------------------------------------------------ the CLI
def _settings(settings: SamplingSettings, **given: Any) -> SamplingSettings:
    return replace(settings, **{k: v for k, v in given.items() if v is not None})


class CLI:
    """``generate`` (text-to-image to PNGs) and ``chat`` (one reply) on a checkpoint directory."""

    def generate(self, checkpoint: str, prompt: str | list[str], out: str, num_images: int = 4, seed: int = 0,
                 cfg_scale: float = DEFAULT_CFG_SCALE, temperature: float | None = None, top_k: int | None = None,
                 top_k_fraction: float | None = None, top_p: float | None = None, batch_size: int | None = None,
                 grid: tuple[int, int] | None = None, image_tokenizer_path: str | None = None,
                 device: str | None = None) -> str:
        """Write ``<out>/<prompt index>_<image index>.png`` and ``<out>/settings.json``; returns the folder."""
        from uni_arch.log_setup import setup_logging

        setup_logging(0)
        overrides = {k: v for k, v in dict(image_tokenizer_path=image_tokenizer_path, device=device).items() if v}
        infer = UniInfer.from_checkpoint(checkpoint, **overrides)
        sampling = _settings(IMAGE_DEFAULTS, temperature=temperature, top_k=top_k, top_k_fraction=top_k_fraction,
                             top_p=top_p)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        results = infer.generate_images(prompts, num_images, seed=seed, grid=grid, cfg_scale=cfg_scale,
                                        sampling=sampling, batch_size=batch_size)
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for j, images in enumerate(results):
            for i, g in enumerate(images):
                name = f"{j:03d}_{i:03d}.png"
                if g.image is not None:
                    g.image.save(folder / name)
                files.append({"file": name, "prompt": g.prompt, "seed": g.seed, "grid": list(g.grid), "codes": g.codes})
        record = {"checkpoint": str(Path(checkpoint).resolve()), "prompts": prompts, "num_images": num_images,
                  "seed": seed, "cfg_scale": cfg_scale, "sampling": vars(sampling), "batch_size": batch_size,
                  "pipeline": infer.pipe.settings, "images": files}
        atomic_write_text(folder / "settings.json", json.dumps(record, indent=2, default=str) + "\n")
        logger.info(f"wrote {len(files)} image(s) and settings.json to {folder}")
        return str(folder)

    def chat(self, checkpoint: str, message: str, image: str | list[str] | None = None, draw: Draw = "never",
             max_new_tokens: int = 128, seed: int = 0, temperature: float | None = None, top_p: float | None = None,
             cfg_scale: float = DEFAULT_CFG_SCALE, out: str | None = None, device: str | None = None) -> str:
        """One user turn (text + optional image paths); prints the reply's text; images go to ``out``."""
        from uni_arch.log_setup import setup_logging

        setup_logging(0)
        infer = UniInfer.from_checkpoint(checkpoint, **({"device": device} if device else {}))
        paths = [] if image is None else [image] if isinstance(image, str) else list(image)
        content = [{"type": "image", "image": p} for p in paths] + [{"type": "text", "text": message}]
        reply = infer.chat([{"role": "user", "content": content}], draw=draw, max_new_tokens=max_new_tokens,
                           seed=seed, text_sampling=_settings(TEXT_DEFAULTS, temperature=temperature, top_p=top_p),
                           cfg_scale=cfg_scale)
        if out and reply.images:
            Path(out).mkdir(parents=True, exist_ok=True)
            for i, g in enumerate(reply.images):
                if g.image is not None:
                    g.image.save(Path(out) / f"reply_{i:03d}.png")
        return reply.text


if __name__ == "__main__":
    import fire

    fire.Fire(CLI)
