"""Records -> training samples ``(input_ids, labels, modality, image_spans)``, built segment by segment.

The loss mask is built *with* the ids (STYLE.md practice 11): every piece of the sample is appended together with
whether it is trained, so nothing is reconstructed from token counts afterwards.

Chat markup comes from files, not code. ``configs/chat_templates/<name>.yaml`` holds each role's start/end/separator,
the document EOS, the text-to-image instruction, the unconditional prompt and the captioning questions;
``<name>.jinja`` holds the same format for ``tokenizer.apply_chat_template``. Three formats ship: ``chatml`` (Qwen2.5's
layout, the default), ``plain`` (no markup: the reference Uni-X prompts) and ``reference`` (the reference's samples
token for token: random instruction and newline choices, pairs and SFT turns laid out differently, each turn
tokenized on its own; see :class:`ChatFormat`'s optional keys). For a text-only conversation in chatml or plain the
renderer produces exactly the ids of ``apply_chat_template`` (tested), because consecutive text pieces are joined
into one string and tokenized at once, as the jinja path does; per-character trained flags are carried through the
tokenizer's offset mapping. A token is trained if any of its characters is (so a BPE token that merges the header's
``\n`` with an answer's leading newlines is trained, as transformers' assistant-token masks do). Image blocks cut
text runs: ``<|vision_start|>`` [size tag] codes ``<|vision_end|>`` are appended as ids (the code and size-tag ids
come from :class:`~modeling.vocab.CodeVocab`, which owns the id layout).

Masking rules (``ignore_instruction=True``; with ``False`` every token is trained):

* ``text``: the text and ``<|endoftext|>``, all trained.
* chat turns: the role's ``start`` (``<|im_start|>{role}\n``) is masked; assistant content and its ``end``
  (``<|im_end|>``, the stop token) are trained; user/system turns are masked; the ``separator`` (``\n``) never is.
* an image that *opens* an assistant turn (t2i, edit targets) is generated after a forced ``<|vision_start|>``
  (inference prompts end with it), so its ``<|vision_start|>`` is masked with the prompt; the size tag, codes,
  ``<|vision_end|>`` and ``<|im_end|>`` are trained. An image later in a trained span keeps ``<|vision_start|>``
  trained: there the model itself decides to start an image.
* ``interleaved``: a plain document (no chat markup) of the turns' values joined by ``interleaved_separator``;
  human values are masked, the rest trained, then ``<|endoftext|>``.

``modality`` is 1 for ``<|vision_start|>``, size tags and image codes and 0 for everything else, ``<|vision_end|>``
included. It is not decided here: it is :meth:`CodeVocab.is_vision_id` of the ids, the very rule the model routes
by, so a sample's labels and the model's branches cannot disagree (tested token by token).

Inference renders its prompts here too (:meth:`SampleBuilder.t2i_prompt_ids`, :meth:`SampleBuilder.chat_prompt_ids`,
:func:`turns_from_messages`), so a prompt is byte-for-byte the masked prefix the model was trained on.
Cost: one tokenizer call per text run. Measured on 2 shared, loaded CPU cores (noisy): ~2,000 samples/s with the
shapes BPE for image_text records with a 16x16 image, ~1,800/s for a 4-turn conversation with one image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from data_process.schema import ImageCodes, Record
from modeling.vocab import IGNORE_INDEX, CodeVocab
from uni_arch.train.packing import Span

SAMPLE_KINDS = ("text", "t2i", "i2t", "conversation", "edit", "interleaved")
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "configs" / "chat_templates"


class SampleError(ValueError):
    """A record that cannot become a sample; the message names the record id (and image index)."""


@dataclass
class Sample:
    """One training sample; all per-token lists have the same length."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    modality: list[int]  # 0 text, 1 vision: CodeVocab.is_vision_id of input_ids (the model's routing rule)
    image_spans: list[Span]  # [start, end) of each image block, <|vision_start|>..<|vision_end|> inclusive
    kind: str  # one of SAMPLE_KINDS

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for ``datasets.Dataset.map`` / the collator."""
        return {
            "input_ids": self.input_ids, "labels": self.labels, "modality": self.modality,
            "image_spans": [list(span) for span in self.image_spans], "kind": self.kind,
        }  # fmt: skip


OPENAI_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
IMAGE_PART_TYPES = ("image", "image_url", "image_gen")  # content parts that stand for one image block


def turns_from_messages(messages: list[dict[str, Any]], image_placeholder: str = "<image>") -> list[dict[str, str]]:
    """OpenAI-style ``messages`` -> record-style turns (``from``/``value``) for :meth:`SampleBuilder.chat_prompt_ids`.

    ``content`` may be a string or a list of parts; image parts (``image`` / ``image_url``, and ``image_gen``: an
    image an assistant turn generated, kept as its codes) become the placeholder, in order, exactly as the jinja
    templates render them. The caller passes the encoded images in the same order.
    """
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in OPENAI_ROLES:
            raise ValueError(f"messages[{i}].role={role!r} is not one of {sorted(OPENAI_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            if not isinstance(content, list):
                raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(part["text"])
                elif kind in IMAGE_PART_TYPES:
                    parts.append(image_placeholder)
                else:
                    raise ValueError(f"messages[{i}].content[{j}].type={kind!r} is not one of text, "
                                     f"{', '.join(IMAGE_PART_TYPES)}")
            content = "".join(parts)
        turns.append({"from": OPENAI_ROLES[role], "value": content})
    return turns


# ------------------------------------------------------------------------------------------ chat format
ROLES = ("system", "human", "gpt")


@dataclass(frozen=True)
class RoleFormat:
    """How one role's turn is written: ``start`` [prefix] content ``end`` ``separator``.

    ``start`` (the header) is masked; ``end`` is trained on ``gpt`` turns (it is the stop token) and masked
    otherwise; ``separator`` is never trained. ``prefix`` (optional, YAML list) is part of the *content*: one of its
    alternatives is drawn per turn with the sample's rng (the first at inference) and trained with the content. It
    exists for the reference's SFT turns, ``"\n" * random.randint(1, 3) + value`` with the newlines of an answer
    trained.
    """

    start: str
    end: str
    separator: str
    prefix: tuple[str, ...] = ()


@dataclass(frozen=True)
class TurnLayout:
    """The roles a sample's turns are written with, the text that opens a reply at inference, and where images go.

    ``images_first``: the images of prompt (non-``gpt``) turns are written before the first turn and their
    placeholders (with one newline right after each, LLaVA's ``<image>\n``) leave the text: the reference's VQA
    layout, one image block and then the turns. Images of ``gpt`` turns stay where they are.
    """

    roles: dict[str, RoleFormat]
    generation_prompt: str
    images_first: bool = False


@dataclass(frozen=True)
class ChatFormat:
    """The training-side description of a chat template (``configs/chat_templates/<name>.yaml``).

    Optional keys (absent from chatml/plain and from checkpoints saved before they existed, which load unchanged):

    * ``t2i_instruction`` may be a list: one is drawn per text-to-image sample with the sample's rng (uniformly, as
      the reference's ``random.choice``); inference prompts use the first.
    * ``conversation``: ``{roles, generation_prompt, images_first}``, the layout of conversation / edit records and
      of chat prompts at inference when it differs from the one of t2i / captioning samples (``roles`` /
      ``generation_prompt``), as the reference's SFT turns differ from its pretraining pairs.
    * ``split_turns``: each turn (and the generation prompt) is tokenized on its own, so BPE never merges across a
      turn boundary (the reference tokenizes every message separately); default False joins the whole text run,
      as ``apply_chat_template`` does.
    """

    chat_template: str
    roles: dict[str, RoleFormat]
    generation_prompt: str
    document_eos: str
    interleaved_separator: str
    image_placeholder: str
    system_prompt: str | None
    t2i_instruction: str | tuple[str, ...]
    unconditional_prompt: str
    i2t_questions: tuple[str, ...]
    conversation: TurnLayout | None = None
    split_turns: bool = False
    source: str = ""

    OPTIONAL = ("conversation", "split_turns")

    @classmethod
    def load(cls, template_dir: str | Path | None = None, name: str = "chatml") -> "ChatFormat":
        path = Path(template_dir if template_dir is not None else DEFAULT_TEMPLATE_DIR) / f"{name}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"chat format {path} not found (template_dir holds <name>.yaml and its jinja)")
        return cls.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))

    @staticmethod
    def _roles(raw: Any, where: str) -> dict[str, RoleFormat]:
        if not isinstance(raw, dict) or set(raw) != set(ROLES):
            raise ValueError(f"{where} must describe exactly {', '.join(ROLES)}, got {raw!r}")
        roles = {}
        for name, spec in raw.items():
            try:
                spec = dict(spec)
                prefix = spec.pop("prefix", [])
                if isinstance(prefix, str) or not all(isinstance(p, str) for p in prefix):
                    raise TypeError(f"prefix must be a list of strings, got {prefix!r}")
                roles[name] = RoleFormat(**spec, prefix=tuple(prefix))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}.{name}: each role needs exactly start, end and separator, and may have "
                                 f"a prefix list ({e})") from e
        return roles

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "ChatFormat":
        """Validate a format's fields (a YAML file's, or the copy a checkpoint carries); errors name ``source``."""
        path = source
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of {sorted(known)}")
        unknown, missing = set(raw) - known, known - set(raw) - set(cls.OPTIONAL)
        if unknown or missing:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        raw = dict(raw)  # never mutate the caller's dict
        raw["roles"] = cls._roles(raw["roles"], f"{path}: roles")
        instructions = raw["t2i_instruction"]
        if isinstance(instructions, list):
            instructions = raw["t2i_instruction"] = tuple(instructions)
        for instruction in instructions if isinstance(instructions, tuple) else (instructions,):
            if not isinstance(instruction, str) or "{prompt}" not in instruction:
                raise ValueError(f"{path}: t2i_instruction must contain '{{prompt}}', got {instruction!r}")
        if not instructions:
            raise ValueError(f"{path}: t2i_instruction must not be an empty list")
        if not raw["i2t_questions"]:
            raise ValueError(f"{path}: i2t_questions must not be empty")
        raw["i2t_questions"] = tuple(raw["i2t_questions"])
        if raw.get("conversation") is not None:
            conv = raw["conversation"]
            if not isinstance(conv, dict) or not {"roles", "generation_prompt"} <= set(conv) <= {
                    "roles", "generation_prompt", "images_first"}:
                raise ValueError(f"{path}: conversation must be a mapping of roles, generation_prompt and optionally "
                                 f"images_first, got {conv!r}")
            raw["conversation"] = TurnLayout(cls._roles(conv["roles"], f"{path}: conversation.roles"),
                                             conv["generation_prompt"], bool(conv.get("images_first", False)))
        if not isinstance(raw.get("split_turns", False), bool):
            raise ValueError(f"{path}: split_turns must be true or false, got {raw['split_turns']!r}")
        return cls(**raw, source=str(path))

    @staticmethod
    def _roles_dict(roles: dict[str, RoleFormat]) -> dict[str, dict[str, Any]]:
        out = {}
        for name, role in roles.items():
            out[name] = {"start": role.start, "end": role.end, "separator": role.separator}
            if role.prefix:
                out[name]["prefix"] = list(role.prefix)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields as the YAML file holds them (inverse of :meth:`from_dict`, ``source`` left out; optional keys
        only when set, so a chatml checkpoint's copy is what it was before they existed)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in ("source", *self.OPTIONAL)}
        d["roles"] = self._roles_dict(self.roles)
        d["i2t_questions"] = list(self.i2t_questions)
        if isinstance(self.t2i_instruction, tuple):
            d["t2i_instruction"] = list(self.t2i_instruction)
        if self.conversation is not None:
            c = self.conversation
            d["conversation"] = {"roles": self._roles_dict(c.roles), "generation_prompt": c.generation_prompt,
                                 "images_first": c.images_first}
        if self.split_turns:
            d["split_turns"] = True
        return d

    @property
    def t2i_instructions(self) -> tuple[str, ...]:
        """The text-to-image instructions; the first is the one inference uses."""
        return self.t2i_instruction if isinstance(self.t2i_instruction, tuple) else (self.t2i_instruction,)

    @property
    def pair_layout(self) -> TurnLayout:
        """The layout of text-to-image and captioning samples (and of t2i prompts at inference)."""
        return TurnLayout(self.roles, self.generation_prompt)

    @property
    def chat_layout(self) -> TurnLayout:
        """The layout of conversation / edit records and of chat prompts at inference."""
        return self.conversation if self.conversation is not None else self.pair_layout

    def jinja_path(self) -> Path:
        return Path(self.source).parent / self.chat_template


# ----------------------------------------------------------------------------------------- the writer
@dataclass
class _Writer:
    """Accumulates one sample: text pieces are buffered into a run and tokenized together; ids go in directly."""

    tokenizer: Any
    code_vocab: CodeVocab
    input_ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    image_spans: list[Span] = field(default_factory=list)
    _run: list[tuple[str, bool]] = field(default_factory=list)

    def text(self, text: str, trained: bool) -> None:
        if text:
            self._run.append((text, trained))

    def ids(self, ids: Sequence[int], trained: bool) -> None:
        self.flush()
        self.input_ids += [int(i) for i in ids]
        self.trained += [trained] * len(ids)

    def flush(self) -> None:
        """Tokenize the buffered run as one string; a token is trained if any of its characters is."""
        if not self._run:
            return
        text = "".join(piece for piece, _ in self._run)
        char_trained = [flag for piece, flag in self._run for _ in piece]
        self._run = []
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            end = max(end, start + 1)  # zero-width offsets (rare) take the flag of the character they sit on
            self.input_ids.append(int(tid))
            self.trained.append(any(char_trained[start:end]))

    def finish(self, kind: str) -> Sample:
        self.flush()
        labels = [tid if t else IGNORE_INDEX for tid, t in zip(self.input_ids, self.trained)]
        assert len(labels) == len(self.input_ids), "writer lists out of step"
        # By id, with the model's own rule: a literal <|vision_start|> typed in text is a vision token too.
        modality = self.code_vocab.is_vision_id(self.input_ids).astype(int).tolist()
        return Sample(list(self.input_ids), labels, modality, list(self.image_spans), kind)


@dataclass
class _Images:
    """A record's images, consumed in placeholder order; knows each one's index for error messages."""

    record_id: str
    images: list[ImageCodes]
    used: int = 0
    order: list[int] | None = None  # consumption order when it is not the list's (TurnLayout.images_first)

    def pop(self, placeholder: str) -> tuple[str, ImageCodes]:
        if self.used >= len(self.images):
            raise SampleError(f"record {self.record_id!r}: more {placeholder} placeholders than images ({len(self.images)})")
        index = self.order[self.used] if self.order is not None else self.used
        self.used += 1
        return f"record {self.record_id!r}: images[{index}]", self.images[index]


# ------------------------------------------------------------------------------------------ the builder
class SampleBuilder:
    """Turn :class:`~data_process.schema.Record` s into :class:`Sample` s (see the module docstring for the rules).

    Args:
        tokenizer: a transformers tokenizer holding the chat and vision special tokens (see
            ``data_process/text_tokenizer.py``).
        code_vocab: the code-id <-> token-id mapping (image ids start at ``len(tokenizer)``).
        t2i_ratio: probability that an ``image_text`` record becomes text-to-image (else image-to-text).
        cfg_dropout: probability that a text-to-image prompt is replaced by the unconditional prompt.
        ignore_instruction: mask prompts (headers, user turns, the forced ``<|vision_start|>``); False trains all.
        size_tags: always put ``<height_h><width_w>`` after ``<|vision_start|>`` (ids from ``code_vocab``, which must
            reserve them: ``max_grid`` > 0).
        fixed_grid: the image tokenizer's native grid ``(h, w)``; images of another grid get a size tag even when
            ``size_tags`` is False. None: only ``size_tags`` decides.
        system_prompt: a system turn for chat samples without one (overrides the YAML's ``system_prompt``).
        template_dir / template_name: where ``<template_name>.yaml`` lives (default ``configs/chat_templates``).
        chat_format: an already loaded format (a checkpoint's own copy, ``uni_x_inference.json``) instead of the file.

    The builder holds no randomness: every draw comes from the ``rng`` passed to :meth:`build`.
    """

    def __init__(
        self,
        tokenizer,
        code_vocab: CodeVocab,
        *,
        t2i_ratio: float = 0.5,
        cfg_dropout: float = 0.1,
        ignore_instruction: bool = True,
        size_tags: bool = False,
        fixed_grid: tuple[int, int] | None = None,
        system_prompt: str | None = None,
        template_dir: str | Path | None = None,
        template_name: str = "chatml",
        chat_format: ChatFormat | None = None,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"SampleBuilder needs a fast (tokenizers-backed) tokenizer for offset mappings, got {type(tokenizer).__name__}"
            )
        for name, p in (("t2i_ratio", t2i_ratio), ("cfg_dropout", cfg_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"SampleBuilder: {name}={p} must be a probability in [0, 1]")
        if code_vocab.image_offset < len(tokenizer):
            raise ValueError(
                f"SampleBuilder: code_vocab.image_offset={code_vocab.image_offset} overlaps the tokenizer "
                f"({len(tokenizer)} tokens): build the CodeVocab after adding every text token"
            )
        if size_tags and not code_vocab.max_grid:
            raise ValueError("SampleBuilder: size_tags=True but the code vocabulary reserves no size tags (max_grid=0): "
                             "build it with CodeVocab.from_tokenizer(..., max_grid=DEFAULT_MAX_GRID)")
        self.tokenizer, self.code_vocab = tokenizer, code_vocab
        self.t2i_ratio, self.cfg_dropout, self.ignore_instruction = t2i_ratio, cfg_dropout, ignore_instruction
        self.size_tags, self.fixed_grid = size_tags, (tuple(fixed_grid) if fixed_grid is not None else None)
        self.format = chat_format if chat_format is not None else ChatFormat.load(template_dir, template_name)
        self.system_prompt = system_prompt if system_prompt is not None else self.format.system_prompt
        ends = {"roles.gpt.end": self.format.roles["gpt"].end}
        if self.format.conversation is not None:
            ends["conversation.roles.gpt.end"] = self.format.conversation.roles["gpt"].end
        end_ids = {what: self._single_id(end, what) for what, end in ends.items() if end}
        # The stop token of a chat reply (None: answers have no end token, as the reference's SFT turns).
        chat_end = "conversation.roles.gpt.end" if self.format.conversation is not None else "roles.gpt.end"
        self.answer_end_id = end_ids.get(chat_end)
        self.document_eos_id = self._single_id(self.format.document_eos, "document_eos")

    def _single_id(self, token: str, what: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"{self.format.source}: {what}={token!r} is {len(ids)} tokens in this tokenizer, expected one special "
                f"token: add it to the tokenizer (data_process/text_tokenizer.py) or pick another chat format"
            )
        return ids[0]

    # ------------------------------------------------------------------------------------- image blocks
    def _wants_size_tag(self, grid: Sequence[int]) -> bool:
        return self.size_tags or (self.fixed_grid is not None and tuple(grid) != self.fixed_grid)

    def size_tag_ids_for(self, grid: Sequence[int]) -> list[int]:
        """The size tag that follows ``<|vision_start|>`` for an image of ``grid`` here ([] when none): what a
        sampler must force after the model opens an image block itself."""
        return self.code_vocab.size_tag_ids(grid) if self._wants_size_tag(grid) else []

    def _image(self, w: _Writer, image: ImageCodes, where: str, trained: bool, start_trained: bool) -> None:
        """Append ``<|vision_start|>`` [size tag] codes ``<|vision_end|>`` and record its span."""
        levels = image.levels if image.levels is not None else 0
        try:
            code_ids = self.code_vocab.codes_to_ids(image.codes, levels).tolist()
            tag = self.code_vocab.size_tag_ids(image.grid) if self._wants_size_tag(image.grid) else []
        except ValueError as e:
            raise SampleError(f"{where}: {e}") from e
        w.ids([self.code_vocab.vision_start_id], start_trained)  # flushes the text run first
        start = len(w.input_ids) - 1
        w.ids(tag + code_ids + [self.code_vocab.vision_end_id], trained)
        w.image_spans.append((start, len(w.input_ids)))

    def _content(self, w: _Writer, value: str, images: _Images, trained: bool, opens_answer: bool) -> None:
        """Text with ``<image>`` placeholders -> text pieces and image blocks; ``images`` is consumed in order."""
        pieces = value.split(self.format.image_placeholder)
        for i, piece in enumerate(pieces):
            if i > 0:
                where, image = images.pop(self.format.image_placeholder)
                forced = opens_answer and i == 1 and pieces[0] == "" and self.ignore_instruction
                self._image(w, image, where, trained, trained and not forced)
            w.text(piece, trained)

    # ---------------------------------------------------------------------------------------- renderers
    @staticmethod
    def _draw(alternatives: Sequence[str], rng: random.Random | None) -> str:
        """One of ``alternatives`` (uniformly, from the sample's rng); the first at inference (``rng=None``). A single
        alternative draws nothing, so formats without choices consume the rng exactly as before."""
        if not alternatives:
            return ""
        return alternatives[0] if rng is None or len(alternatives) == 1 else rng.choice(alternatives)

    def _hoist_images(self, w: _Writer, turns: list[dict[str, str]], images: _Images) -> list[dict[str, str]]:
        """``images_first``: write the prompt turns' images now and return the turns without their placeholders."""
        ph = self.format.image_placeholder
        prompt_idx, answer_idx, k = [], [], 0
        for turn in turns:
            n = turn["value"].count(ph)
            (answer_idx if turn["from"] == "gpt" else prompt_idx).extend(range(k, k + n))
            k += n
        images.order = prompt_idx + answer_idx  # gpt turns then take theirs, in order, where they stand
        train_prompt = not self.ignore_instruction
        for _ in prompt_idx:
            where, image = images.pop(ph)
            self._image(w, image, where, train_prompt, train_prompt)
        strip = lambda value: value.replace(ph + "\n", "").replace(ph, "")  # noqa: E731
        return [turn if turn["from"] == "gpt" else {**turn, "value": strip(turn["value"])} for turn in turns]

    def _chat(self, w: _Writer, turns: list[dict[str, str]], images: _Images, rid: str, layout: TurnLayout,
              rng: random.Random | None) -> None:
        """Chat turns in ``layout``; ``rng`` draws the role prefixes (None at inference: the first of each)."""
        train_prompt = not self.ignore_instruction
        if self.system_prompt and not (turns and turns[0]["from"] == "system"):
            turns = [{"from": "system", "value": self.system_prompt}] + list(turns)
        for t, turn in enumerate(turns):
            if turn["from"] not in layout.roles:
                raise SampleError(f"record {rid!r}: conversations[{t}].from={turn['from']!r} is not one of {ROLES}")
        if layout.images_first:
            turns = self._hoist_images(w, turns, images)
        for turn in turns:
            role = layout.roles[turn["from"]]
            answer = turn["from"] == "gpt"
            trained = answer or train_prompt
            prefix = self._draw(role.prefix, rng)
            w.text(role.start, train_prompt)
            w.text(prefix, trained)
            self._content(w, turn["value"], images, trained, opens_answer=answer and not prefix)
            w.text(role.end, trained)
            w.text(role.separator, train_prompt)
            if self.format.split_turns:
                w.flush()

    def _document(self, w: _Writer, turns: list[dict[str, str]], images: _Images) -> None:
        prev_trained = None
        for turn in turns:
            trained = turn["from"] != "human" or not self.ignore_instruction
            if prev_trained is not None:  # a separator is document text only between two trained values
                w.text(self.format.interleaved_separator, trained and prev_trained)
            prev_trained = trained
            self._content(w, turn["value"], images, trained, opens_answer=False)
        w.ids([self.document_eos_id], True)

    def _t2i_turns(self, caption: str, rng: random.Random) -> list[dict[str, str]]:
        if rng.random() < self.cfg_dropout:
            prompt = self.format.unconditional_prompt
        else:
            prompt = self._draw(self.format.t2i_instructions, rng).format(prompt=caption)
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": self.format.image_placeholder}]

    def _i2t_turns(self, caption: str, rng: random.Random) -> list[dict[str, str]]:
        question = rng.choice(self.format.i2t_questions)
        return [{"from": "human", "value": self.format.image_placeholder + question}, {"from": "gpt", "value": caption}]

    # --------------------------------------------------------------------------------------- public API
    def build(self, record: Record, rng: random.Random) -> Sample:
        """Render one record; the only randomness (direction, CFG dropout, question) is drawn from ``rng``."""
        rid = record.id
        images = _Images(rid, list(record.images))
        w = _Writer(self.tokenizer, self.code_vocab)
        if record.type == "text" and record.input_ids is not None:  # pre-tokenised (the reference's input_ids rows):
            w.ids(record.input_ids, True)  # trained verbatim, nothing added, as the reference does
            return w.finish("text")
        if record.type == "text":
            if not record.text:
                raise SampleError(f"record {rid!r}: a text record needs a non-empty text")
            w.text(record.text, True)
            w.ids([self.document_eos_id], True)
            return w.finish("text")
        if record.type in ("image_text", "t2i", "i2t"):
            if not record.text or len(record.images) != 1:
                raise SampleError(
                    f"record {rid!r}: a {record.type} record needs a text and exactly 1 image, got {len(record.images)}"
                )
            kind = record.type
            if kind == "image_text":
                kind = "t2i" if rng.random() < self.t2i_ratio else "i2t"
            turns = self._t2i_turns(record.text, rng) if kind == "t2i" else self._i2t_turns(record.text, rng)
        elif record.type in ("conversation", "edit", "interleaved"):
            kind, turns = record.type, record.conversations or []
            n_ph = sum(turn["value"].count(self.format.image_placeholder) for turn in turns)
            if n_ph != len(record.images):
                raise SampleError(
                    f"record {rid!r}: {n_ph} {self.format.image_placeholder} placeholder(s) but {len(record.images)} image(s)"
                )
            if kind == "edit" and not any(
                turn["from"] == "gpt" and self.format.image_placeholder in turn["value"] for turn in turns
            ):
                raise SampleError(f"record {rid!r}: an edit record needs the target image in a 'gpt' turn")
        else:
            raise SampleError(f"record {rid!r}: unknown type {record.type!r} (known: {', '.join(SAMPLE_KINDS)}, image_text)")
        if kind == "interleaved":
            self._document(w, turns, images)
        else:
            layout = self.format.pair_layout if kind in ("t2i", "i2t") else self.format.chat_layout
            self._chat(w, turns, images, rid, layout, rng)
        return w.finish(kind)

    def t2i_prompt_ids(self, prompt: str | None, grid: Sequence[int] | None = None) -> list[int]:
        """The text-to-image inference prompt, ids identical to a training t2i sample's masked prefix.

        ``prompt=None`` gives the unconditional prompt (CFG). Ends with ``<|vision_start|>`` and, when this builder
        would tag ``grid``, its size tag. Inference and training share this one rendering.
        """
        instruction = self.format.t2i_instructions[0]
        value = self.format.unconditional_prompt if prompt is None else instruction.format(prompt=prompt)
        ids = self._prompt_ids([{"from": "human", "value": value}], [], self.format.pair_layout)
        ids.append(self.code_vocab.vision_start_id)
        return ids + (self.size_tag_ids_for(grid) if grid is not None else [])

    def chat_prompt_ids(self, turns: list[dict[str, str]], images: list[ImageCodes]) -> list[int]:
        """Render ``turns`` (record-style ``from``/``value``) plus the generation prompt: the input for a reply.

        Conversation layout (``ChatFormat.chat_layout``); role prefixes take their first alternative."""
        return self._prompt_ids(turns, images, self.format.chat_layout)

    def _prompt_ids(self, turns: list[dict[str, str]], images: list[ImageCodes], layout: TurnLayout) -> list[int]:
        n_ph = sum(turn["value"].count(self.format.image_placeholder) for turn in turns)
        if n_ph != len(images):
            raise SampleError(f"prompt: {n_ph} {self.format.image_placeholder} placeholder(s) but {len(images)} image(s)")
        w = _Writer(self.tokenizer, self.code_vocab)
        self._chat(w, turns, _Images("prompt", list(images)), "prompt", layout, None)
        w.text(layout.generation_prompt, False)
        return w.finish("conversation").input_ids
