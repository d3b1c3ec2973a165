"""Text tokenizers: the shapes BPE (trained here on a tiny corpus) and the offline Qwen2.5 conversion."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_process import text_tokenizer
from data_process.text_tokenizer import (
    QWEN25_LEN,
    add_vision_tokens,
    load_qwen25_tokenizer,
    load_text_tokenizer,
    shapes_special_tokens,
    train_shapes_tokenizer,
)
from modeling.vocab import DEFAULT_MAX_GRID, CodeVocab

CORPUS = [
    "two red circles left of a blue square",
    "a green triangle above three yellow squares",
    "How many circles are there? There are 2 circles.",
    "What colour is the square? The square is blue.",
    "an orange star right of a purple circle",
] * 20


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_tok") / "tokenizer"
    train_shapes_tokenizer(CORPUS, out, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    """One conversion per session: test_templates.py uses the same directory (loading is ~1 s, converting ~2 s)."""
    return tmp_path_factory.getbasetemp() / "uni_x_qwen_cache"


@pytest.fixture(scope="module")
def qwen(qwen_cache):
    return load_qwen25_tokenizer(cache_dir=qwen_cache)


# ------------------------------------------------------------------------------------------ shapes BPE
def test_shapes_tokenizer_loads_with_autotokenizer_and_keeps_specials(shapes_dir):
    tok = AutoTokenizer.from_pretrained(shapes_dir)
    specials = shapes_special_tokens()
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(len(specials)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 256 + len(specials) < len(tok) <= 400
    assert "<|im_start|>" in tok.chat_template
    text = "two red circles left of a blue square"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) // 2  # merges were learned, not just bytes
    # Special tokens are whole tokens inside text, as in Qwen2.5.
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2


def test_shapes_tokenizer_training_is_deterministic(shapes_dir, tmp_path):
    train_shapes_tokenizer(CORPUS, tmp_path / "again", vocab_size=400)
    first = json.loads((shapes_dir / "tokenizer.json").read_text())["model"]
    second = json.loads((tmp_path / "again" / "tokenizer.json").read_text())["model"]
    assert first["vocab"] == second["vocab"] and first["merges"] == second["merges"]


def test_shapes_tokenizer_digits_split_like_qwen(shapes_dir):
    tok = AutoTokenizer.from_pretrained(shapes_dir)
    pieces = tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"])
    assert pieces == ["1", "2", "3"]


def test_shapes_tokenizer_has_no_size_tag_tokens(tmp_path):
    """Size tags belong to the code vocabulary (after the codes), never to a tokenizer."""
    tok = train_shapes_tokenizer(CORPUS[:5], None, vocab_size=500)
    assert tok.convert_tokens_to_ids("<height_1>") is None and len(shapes_special_tokens()) == 6
    vocab = CodeVocab.from_tokenizer(tok, [64], max_grid=8)
    assert vocab.size_tag_ids((1, 8)) == [len(tok) + 64, len(tok) + 64 + 8 + 7]
    assert not (tmp_path / "tokenizer").exists()


def test_shapes_tokenizer_errors():
    with pytest.raises(ValueError, match="leaves no room for merges"):
        train_shapes_tokenizer(CORPUS, None, vocab_size=262)
    with pytest.raises(ValueError, match="empty"):
        train_shapes_tokenizer([], None, vocab_size=400)
    with pytest.raises(TypeError, match="text #1 is int"):
        train_shapes_tokenizer(["ok", 3], None, vocab_size=400)


def test_code_vocab_from_shapes_tokenizer(shapes_dir):
    tok = AutoTokenizer.from_pretrained(shapes_dir)
    vocab = CodeVocab.from_tokenizer(tok, [64])
    assert vocab.image_offset == len(tok)
    assert (vocab.vision_start_id, vocab.vision_end_id) == (3, 4)
    assert vocab.codes_to_ids([0, 63]).tolist() == [len(tok), len(tok) + 63]


# --------------------------------------------------------------------------------------------- Qwen2.5
def test_qwen25_special_ids_and_length(qwen):
    assert len(qwen) == QWEN25_LEN == 151665
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
        "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|file_sep|>": 151664,
    }  # fmt: skip
    assert {t: qwen.convert_tokens_to_ids(t) for t in expected} == expected
    assert qwen.eos_token_id == 151645 and qwen.pad_token_id == 151643


def test_qwen25_ordinary_strings_match_reference_ids(qwen):
    # Reference ids published with Qwen2.5 (tokenizer.json / prompts dumped from the HF tokenizer).
    enc = lambda s: qwen(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("Hello") == [9707]
    assert enc(" world") == [1879]
    assert enc("您好, 请从 1 数到 10000000.") == [111308, 11, 220, 14880, 45181, 220, 16, 47685, 26939, 220, 16] + [15] * 7 + [13]
    chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert enc(chat) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198]  # fmt: skip


def test_qwen25_chat_template_matches_reference(qwen):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}]
    ids = qwen.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids[:9] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13] and ids[-3:] == [151644, 77091, 198]


def test_qwen25_cache_and_size_tags_after_the_image_range(qwen, qwen_cache):
    """Image code c is token 151665 + c with size tags on, as in the reference checkpoints; the tags follow the
    8,192 codes (issue 8: appending them to the tokenizer moved image_offset to 151,793)."""
    (cached,) = [p for p in qwen_cache.iterdir() if p.name.startswith("qwen2.5-tokenizer-")]
    assert (cached / "tokenizer.json").is_file()
    again = load_qwen25_tokenizer(cache_dir=qwen_cache)  # from the cache
    assert len(again) == 151665
    vocab = CodeVocab.from_tokenizer(again, [8192], max_grid=DEFAULT_MAX_GRID)
    assert vocab.codes_to_ids([0, 8191]).tolist() == [151665, 159856]
    assert (vocab.vision_start_id, vocab.vision_end_id) == (151652, 151653)
    assert vocab.size_tag_range == (159857, 159985) and vocab.total_vocab_size == 159985
    assert vocab.size_tag_ids((1, 1)) == [159857, 159921] and vocab.size_tag_ids((64, 64)) == [159920, 159984]
    assert vocab.is_vision_id([151652, 151665, 159857, 159984]).all()
    assert not vocab.is_vision_id([151653, 151664, 159985]).any()
    # The tags fit in the rows of the reference's released checkpoints (160,128).
    assert vocab.total_vocab_size <= 160128
    # Qwen2.5 marks the tool/FIM tokens non-special: skip_special_tokens keeps them.
    assert again.decode([151643, 151657, 9707], skip_special_tokens=True) == "<tool_call>Hello"


def test_load_text_tokenizer_routes(shapes_dir, monkeypatch):
    assert len(load_text_tokenizer(str(shapes_dir))) == len(AutoTokenizer.from_pretrained(shapes_dir))
    monkeypatch.setattr(text_tokenizer, "load_qwen25_tokenizer", lambda **kw: ("qwen", kw))
    assert load_text_tokenizer("Qwen2.5", cache_dir="c") == ("qwen", {"cache_dir": "c"})
    with pytest.raises(ValueError, match="unknown text tokenizer 'Qwen/Qwen2.5-7B'.*Hub ids are not fetched"):
        load_text_tokenizer("Qwen/Qwen2.5-7B")
    with pytest.raises(ValueError, match="apply only to 'qwen2.5'"):
        load_text_tokenizer(str(shapes_dir), cache_dir="c")


def test_add_vision_tokens_to_third_party_tokenizer():
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(ValueError, match="no '<\\|vision_start\\|>' token"):
        CodeVocab.from_tokenizer(tok, [16])
    assert add_vision_tokens(tok) == 2 + 1
    assert add_vision_tokens(tok) == 0  # idempotent
    vocab = CodeVocab.from_tokenizer(tok, [16])
    assert (vocab.vision_start_id, vocab.vision_end_id, vocab.image_offset) == (3, 4, 6)
    assert tok("a <|vision_start|> b <unconditional>", add_special_tokens=False)["input_ids"] == [1, 3, 2, 5]


def test_cli_train_adds_chat_format_strings(tmp_path, monkeypatch):
    monkeypatch.setattr(text_tokenizer, "shapes_corpus", lambda *a, **k: iter(CORPUS))
    out = tmp_path / "tok"
    assert text_tokenizer._CLI().train(out_dir=str(out), vocab_size=450).endswith("tokens")
    tok = AutoTokenizer.from_pretrained(out)
    # The fixed prompt strings were in the training texts: they encode word by word, not byte by byte.
    assert len(tok(" Generate an image based on this description.", add_special_tokens=False)["input_ids"]) == 8
