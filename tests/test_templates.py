"""Sample builders: exact ids, labels, modality and spans on a hand-built word-level tokenizer; equality with
``apply_chat_template`` on the hand-built, the shapes BPE and the Qwen2.5 tokenizers; sampling frequencies."""

from __future__ import annotations

import random
import re
import shutil

import pytest
import yaml
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_process.schema import ImageCodes, Record
from data_process.text_tokenizer import load_qwen25_tokenizer, train_shapes_tokenizer
from modeling.vocab import IGNORE_INDEX, CodeVocab
from uni_arch.train.templates import (
    DEFAULT_TEMPLATE_DIR,
    ChatFormat,
    SampleBuilder,
    SampleError,
    turns_from_messages,
)

M = IGNORE_INDEX
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<unconditional>"]
EOT, IMS, IME, VS, VE, UNCOND = range(6)
WORDS = ["[UNK]", "\n", " ", ".", "?", "!", "user", "assistant", "system", "a", "red", "circle", "Generate", "an", "image",
         "based", "on", "this", "description", "Describe", "what", "colour", "it", "is", "blue", "square", "make", "hi",
         "hello", "more", "text", "and", "then", "You", "are", "helpful"]  # fmt: skip
V = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
WORD_RE = r"\w+|[^\w\s]|\s"
N_TEXT = len(V)  # image codes start here


def words(text: str) -> list[int]:
    """Expected ids of plain text, spelled out independently of the tokenizers library."""
    return [V[w] for w in re.findall(WORD_RE, text)]


def header(role: str) -> list[int]:
    return [IMS, V[role], V["\n"]]


@pytest.fixture(scope="module")
def tok():
    raw = Tokenizer(models.WordLevel(V, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_RE), behavior="isolated")
    raw.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=(DEFAULT_TEMPLATE_DIR / "chatml.jinja").read_text(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def vocab(tok):
    return CodeVocab.from_tokenizer(tok, [8, 4], max_grid=4)  # size tags <height_1..4><width_1..4> after the codes


@pytest.fixture(scope="module")
def one_question_dir(tmp_path_factory):
    """A template dir whose only captioning question is known, so i2t samples are exact."""
    d = tmp_path_factory.mktemp("tmpl")
    for name in ("chatml.yaml", "chatml.jinja"):
        shutil.copy(DEFAULT_TEMPLATE_DIR / name, d / name)
    cfg = yaml.safe_load((d / "chatml.yaml").read_text())
    cfg["i2t_questions"] = ["\nDescribe this image."]
    (d / "chatml.yaml").write_text(yaml.safe_dump(cfg))
    return d


def img(codes, grid=(2, 2), levels=None) -> ImageCodes:
    return ImageCodes(codes=list(codes), grid=grid, tokenizer="test-vq", levels=levels)


def codes(*cs: int) -> list[int]:
    return [N_TEXT + c for c in cs]


def labels_of(ids: list[int], trained: list[bool]) -> list[int]:
    return [i if t else M for i, t in zip(ids, trained)]


# ---------------------------------------------------------------------------------------- exact samples
def test_text_record(tok, vocab):
    s = SampleBuilder(tok, vocab).build(Record("t", "text", text="hello blue square."), random.Random(0))
    assert s.input_ids == words("hello blue square.") + [EOT]
    assert s.labels == s.input_ids and s.modality == [0] * len(s) and s.image_spans == [] and s.kind == "text"


def test_t2i_exact_ids_labels_modality_spans(tok, vocab):
    b = SampleBuilder(tok, vocab, cfg_dropout=0.0)
    s = b.build(Record("r", "t2i", text="a red circle", images=[img([1, 2, 3, 7])]), random.Random(0))
    prompt = header("user") + words("a red circle Generate an image based on this description.") + [IME, V["\n"]]
    prompt += header("assistant") + [VS]
    answer = codes(1, 2, 3, 7) + [VE, IME]
    assert s.input_ids == prompt + answer + [V["\n"]]
    # Masked up to and including <|vision_start|>; codes, <|vision_end|> and <|im_end|> trained; the newline not.
    assert s.labels == [M] * len(prompt) + answer + [M]
    assert s.modality == [0] * (len(prompt) - 1) + [1] * 5 + [0, 0, 0]
    assert s.image_spans == [(len(prompt) - 1, len(prompt) + 5)]
    assert s.kind == "t2i"
    assert b.t2i_prompt_ids("a red circle") == prompt  # inference renders the same prefix


def test_t2i_unconditional_prompt(tok, vocab):
    b = SampleBuilder(tok, vocab, cfg_dropout=1.0)
    s = b.build(Record("r", "t2i", text="a red circle", images=[img([0, 0, 0, 0])]), random.Random(0))
    prompt = header("user") + [UNCOND, IME, V["\n"]] + header("assistant") + [VS]
    assert s.input_ids[: len(prompt)] == prompt and b.t2i_prompt_ids(None) == prompt
    assert s.labels[: len(prompt)] == [M] * len(prompt)


def test_i2t_exact(tok, vocab, one_question_dir):
    b = SampleBuilder(tok, vocab, template_dir=one_question_dir)
    s = b.build(Record("r", "i2t", text="a red circle", images=[img([4, 5, 6, 7])]), random.Random(0))
    prompt = header("user") + [VS] + codes(4, 5, 6, 7) + [VE] + words("\nDescribe this image.") + [IME, V["\n"]]
    prompt += header("assistant")
    answer = words("a red circle") + [IME]
    assert s.input_ids == prompt + answer + [V["\n"]]
    assert s.labels == [M] * len(prompt) + answer + [M]
    assert s.image_spans == [(3, 9)] and s.modality[3:8] == [1] * 5 and s.modality[8] == 0
    assert s.kind == "i2t"


def test_ignore_instruction_false_trains_everything(tok, vocab):
    b = SampleBuilder(tok, vocab, cfg_dropout=0.0, ignore_instruction=False)
    s = b.build(Record("r", "t2i", text="a red circle", images=[img([1, 2, 3, 4])]), random.Random(0))
    assert s.labels == s.input_ids


def test_conversation_multi_turn_with_images(tok, vocab):
    conv = [
        {"from": "human", "value": "<image>what colour is it?"},
        {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "make it red"},
        {"from": "gpt", "value": "hello <image>"},
    ]
    rec = Record("c", "conversation", conversations=conv, images=[img([1, 1, 1, 1]), img([2, 2, 2, 2])])
    s = SampleBuilder(tok, vocab).build(rec, random.Random(0))
    nl = [V["\n"]]
    t1 = header("user") + [VS] + codes(1, 1, 1, 1) + [VE] + words("what colour is it?") + [IME] + nl
    t2h, t2a = header("assistant"), words("blue") + [IME]
    t3 = nl + header("user") + words("make it red") + [IME] + nl
    t4h, t4a = header("assistant"), words("hello ") + [VS] + codes(2, 2, 2, 2) + [VE, IME]
    assert s.input_ids == t1 + t2h + t2a + t3 + t4h + t4a + nl
    # Mid-answer image: the model decides to start it, so <|vision_start|> is trained.
    assert s.labels == [M] * len(t1 + t2h) + t2a + [M] * len(t3 + t4h) + t4a + [M]
    second = len(t1 + t2h + t2a + t3 + t4h) + 2
    assert s.image_spans == [(3, 9), (second, second + 6)]
    assert s.kind == "conversation"


def test_edit_target_image_opens_answer(tok, vocab):
    conv = [{"from": "human", "value": "<image>\nmake it blue"}, {"from": "gpt", "value": "<image>"}]
    rec = Record("e", "edit", conversations=conv, images=[img([1, 2, 3, 4]), img([5, 6, 7, 0])])
    s = SampleBuilder(tok, vocab).build(rec, random.Random(0))
    prompt = header("user") + [VS] + codes(1, 2, 3, 4) + [VE] + words("\nmake it blue") + [IME, V["\n"]]
    prompt += header("assistant") + [VS]
    assert s.input_ids == prompt + codes(5, 6, 7, 0) + [VE, IME, V["\n"]]
    assert s.labels == [M] * len(prompt) + codes(5, 6, 7, 0) + [VE, IME, M]
    assert s.image_spans == [(3, 9), (len(prompt) - 1, len(prompt) + 5)] and s.kind == "edit"


def test_interleaved_is_a_plain_document(tok, vocab):
    conv = [{"from": "gpt", "value": "a red circle <image> and then"}, {"from": "gpt", "value": "more text <image>"}]
    rec = Record("i", "interleaved", conversations=conv, images=[img([1, 1, 1, 1]), img([3, 3, 3, 3])])
    s = SampleBuilder(tok, vocab).build(rec, random.Random(0))
    expect = words("a red circle ") + [VS] + codes(1, 1, 1, 1) + [VE] + words(" and then") + [V["\n"]]
    expect += words("more text ") + [VS] + codes(3, 3, 3, 3) + [VE, EOT]
    assert s.input_ids == expect and s.labels == expect
    assert [s.input_ids[a] for a, _ in s.image_spans] == [VS, VS] and [s.input_ids[b - 1] for _, b in s.image_spans] == [VE, VE]
    # A human value inside an interleaved record is a prompt: masked, like its separator.
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    s = SampleBuilder(tok, vocab).build(Record("i2", "interleaved", conversations=conv), random.Random(0))
    assert s.input_ids == words("hi\nhello") + [EOT] and s.labels == [M, M] + words("hello") + [EOT]
    assert s.to_dict()["labels"] == s.labels and s.num_trained == 2


def test_system_prompt_and_multilevel_codes(tok, vocab):
    b = SampleBuilder(tok, vocab, system_prompt="You are helpful.", cfg_dropout=0.0)
    image = ImageCodes(codes=[7, 3, 0, 1], grid=(1, 1), tokenizer="hq", levels=[0, 1, 1, 1])
    s = b.build(Record("m", "t2i", text="a red circle", images=[image]), random.Random(0))
    system = header("system") + words("You are helpful.") + [IME, V["\n"]]
    assert s.input_ids[: len(system)] == system
    (start, end), = s.image_spans
    assert s.input_ids[start + 1 : end - 1] == [N_TEXT + 7, N_TEXT + 8 + 3, N_TEXT + 8, N_TEXT + 9]


# ------------------------------------------------------------------------------------------- size tags
TAGS = N_TEXT + 12  # <height_1> (codes use 8 + 4 ids); <width_w> is TAGS + 4 + w - 1


def test_size_tags(tok, vocab):
    image = img([1, 2, 3, 4], grid=(1, 4))
    rec = Record("s", "t2i", text="a red circle", images=[image])
    tagged = SampleBuilder(tok, vocab, size_tags=True, cfg_dropout=0.0).build(rec, random.Random(0))
    (start, end), = tagged.image_spans
    assert tagged.input_ids[start:end] == [VS, TAGS, TAGS + 4 + 3] + codes(1, 2, 3, 4) + [VE]
    assert tagged.labels[start:end] == [M] + tagged.input_ids[start + 1 : end]
    odd = SampleBuilder(tok, vocab, fixed_grid=(2, 2), cfg_dropout=0.0).build(rec, random.Random(0))
    assert odd.input_ids == tagged.input_ids  # grid differs from the native one: tagged anyway
    native = Record("n", "t2i", text="a red circle", images=[img([1, 2, 3, 4])])
    plain = SampleBuilder(tok, vocab, fixed_grid=(2, 2), cfg_dropout=0.0).build(native, random.Random(0))
    assert not vocab.is_size_tag_id(plain.input_ids).any()
    big = Record("b", "t2i", text="a red circle", images=[img([0] * 10, grid=(2, 5))])
    with pytest.raises(SampleError, match=r"record 'b': images\[0\]: grid 2x5 has no size tag.*up to 4x4"):
        SampleBuilder(tok, vocab, size_tags=True).build(big, random.Random(0))
    with pytest.raises(ValueError, match="reserves no size tags"):
        SampleBuilder(tok, CodeVocab.from_tokenizer(tok, [8, 4]), size_tags=True)


def test_size_tagged_block_is_vision_in_samples_and_in_the_model_routing(tok, vocab, monkeypatch):
    """``<|vision_start|> <h><w> codes <|vision_end|>``: start, tags and codes are vision both in the sample's
    ``modality`` and in the routing the Uni-X model builds in its forward (token by token, the same mask), so with
    ``all_modal_visible=0`` the tags and the first code are predicted in the vision branch that sees
    ``<|vision_start|>`` (issue 8: the tags were text and could not see it)."""
    import torch

    from modeling import UniXConfig, build_model
    from modeling.modality import ModalityRouting

    conv = [{"from": "human", "value": "<image>what colour is it?"}, {"from": "gpt", "value": "blue"}]
    rec = Record("c", "conversation", conversations=conv, images=[img([1, 2, 3, 4], grid=(2, 2))])
    s = SampleBuilder(tok, vocab, size_tags=True).build(rec, random.Random(0))
    (start, end), = s.image_spans
    assert s.input_ids[start:end] == [VS, TAGS + 1, TAGS + 4 + 1] + codes(1, 2, 3, 4) + [VE]
    assert s.modality[start:end] == [1, 1, 1, 1, 1, 1, 1, 0]
    assert sum(s.modality) == 7  # nothing outside the block is vision

    config = UniXConfig.from_dict_with_vocab(dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vision_encode_layers=1, vision_decode_layers=1, all_modal_visible=0, vocab_size=16), vocab)
    config = UniXConfig.from_dict(config.to_dict())  # the size tags survive config.json
    assert config.code_vocab == vocab and config.vocab_size == vocab.total_vocab_size
    seen = []
    build = ModalityRouting.build.__func__

    def spy(cls, vision_BT, *args, **kwargs):
        seen.append(vision_BT.clone())
        return build(cls, vision_BT, *args, **kwargs)

    monkeypatch.setattr(ModalityRouting, "build", classmethod(spy))
    model = build_model(config, attn_implementation="eager").eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([s.input_ids]), use_cache=False)
    assert seen and seen[0][0].int().tolist() == s.modality


# ---------------------------------------------------------------------------------------------- errors
def test_out_of_range_code_names_record_and_image(tok, vocab):
    conv = [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "hi"}]
    rec = Record("bad-7", "conversation", conversations=conv, images=[img([1, 2, 3, 4]), img([1, 8, 3, 4])])
    with pytest.raises(SampleError, match=r"record 'bad-7': images\[1\]: code 8 at position 1 is outside codebook level 0"):
        SampleBuilder(tok, vocab).build(rec, random.Random(0))


def test_placeholder_image_count_mismatch(tok, vocab):
    conv = [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "hello"}]
    rec = Record("mm", "conversation", conversations=conv, images=[img([1, 2, 3, 4]), img([1, 2, 3, 4])])
    with pytest.raises(SampleError, match=r"record 'mm': 1 <image> placeholder\(s\) but 2 image\(s\)"):
        SampleBuilder(tok, vocab).build(rec, random.Random(0))
    with pytest.raises(SampleError, match="exactly 1 image"):
        SampleBuilder(tok, vocab).build(Record("x", "t2i", text="a", images=[]), random.Random(0))
    with pytest.raises(SampleError, match="target image in a 'gpt' turn"):
        edit = [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "hi"}]
        SampleBuilder(tok, vocab).build(Record("e", "edit", conversations=edit, images=[img([1] * 4)] * 2), random.Random(0))


def test_turns_from_messages_renders_like_the_template(qwen):
    b = SampleBuilder(qwen, CodeVocab.from_tokenizer(qwen, [16]))
    text_only = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world?"}]},
    ]
    ref = qwen.apply_chat_template(text_only, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert b.chat_prompt_ids(turns_from_messages(text_only), []) == ref
    with_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {}}, {"type": "text", "text": "What?"}]}]
    turns = turns_from_messages(with_image)
    assert turns == [{"from": "human", "value": "<image>What?"}]
    assert "<|im_start|>user\n<image>What?<|im_end|>" in qwen.apply_chat_template(with_image, tokenize=False)
    # an image the assistant generated (kept as codes by evaluation/uni_infer.py) is a placeholder in both renderers
    gen = [{"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "image_gen", "codes": [1]}]}]
    assert turns_from_messages(gen) == [{"from": "gpt", "value": "Here:<image>"}]
    assert "<|im_start|>assistant\nHere:<image><|im_end|>" in qwen.apply_chat_template(gen, tokenize=False)
    ids = b.chat_prompt_ids(turns, [img([1, 2, 3, 4])])
    assert ids[:3] == [151644, 872, 198] and ids[-3:] == [151644, 77091, 198]
    assert ids[3:9] == [151652] + [151665 + c for c in (1, 2, 3, 4)] + [151653]
    with pytest.raises(ValueError, match=r"messages\[0\].role='tool'"):
        turns_from_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(SampleError, match="1 <image> placeholder"):
        b.chat_prompt_ids(turns, [])


def test_bad_configuration(tok, vocab, tmp_path):
    with pytest.raises(TypeError, match="fast"):
        SampleBuilder(object(), vocab)
    with pytest.raises(ValueError, match="cfg_dropout=1.5"):
        SampleBuilder(tok, vocab, cfg_dropout=1.5)
    with pytest.raises(ValueError, match="overlaps the tokenizer"):
        SampleBuilder(tok, CodeVocab(N_TEXT - 1, (8,), VS, VE))
    (tmp_path / "chatml.yaml").write_text("turn_end: x\n")
    with pytest.raises(ValueError, match="missing keys"):
        ChatFormat.load(tmp_path)


# --------------------------------------------------------------------------------- sampling frequencies
def test_cfg_dropout_and_t2i_ratio_frequencies(tok, vocab):
    b = SampleBuilder(tok, vocab, t2i_ratio=0.3, cfg_dropout=0.1)
    rng = random.Random(1234)
    rec = Record("f", "image_text", text="a red circle", images=[img([1, 2, 3, 4])])
    kinds, uncond = [], 0
    for _ in range(3000):
        s = b.build(rec, rng)
        kinds.append(s.kind)
        uncond += s.kind == "t2i" and UNCOND in s.input_ids
    n_t2i = kinds.count("t2i")
    # Binomial: 3 standard deviations are ~0.025 (t2i share) and ~0.017 (dropout share of ~900 t2i samples).
    assert abs(n_t2i / 3000 - 0.3) < 0.025
    assert abs(uncond / n_t2i - 0.1) < 0.03
    assert set(kinds) == {"t2i", "i2t"}
    always = SampleBuilder(tok, vocab, t2i_ratio=1.0)
    never = SampleBuilder(tok, vocab, t2i_ratio=0.0)
    assert all(always.build(rec, rng).kind == "t2i" and never.build(rec, rng).kind == "i2t" for _ in range(50))


def test_same_rng_state_same_sample(tok, vocab):
    b = SampleBuilder(tok, vocab)
    rec = Record("d", "image_text", text="a red circle", images=[img([1, 2, 3, 4])])
    first = [b.build(rec, random.Random(s)).input_ids for s in range(20)]
    assert first == [b.build(rec, random.Random(s)).input_ids for s in range(20)]
    assert len({tuple(x) for x in first}) > 1


# ------------------------------------------------------------------- training render == apply_chat_template
CONVERSATIONS = [
    [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " hello!"}],
    [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": "what colour is it?"},
        {"from": "gpt", "value": "blue and red.\n\n it is a square"},
        {"from": "human", "value": " more text"},
        {"from": "gpt", "value": " a square"},
    ],
]


def _messages(conv):
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in conv]


@pytest.fixture(scope="module")
def shapes_tok():
    return train_shapes_tokenizer(["a red circle and a blue square.", "what colour is it? hello"] * 10, None, 400, 4)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    # Same directory as tests/test_text_tokenizer.py: one conversion per session.
    return load_qwen25_tokenizer(cache_dir=tmp_path_factory.getbasetemp() / "uni_x_qwen_cache")


@pytest.mark.parametrize("fmt", ["chatml", "plain"])
@pytest.mark.parametrize("which", ["hand", "shapes", "qwen"])
@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["short", "system-multiturn"])
def test_training_render_equals_apply_chat_template(fmt, which, conv, request):
    tokenizer = request.getfixturevalue({"hand": "tok", "shapes": "shapes_tok", "qwen": "qwen"}[which])
    vocab = CodeVocab.from_tokenizer(tokenizer, [16])
    b = SampleBuilder(tokenizer, vocab, template_name=fmt)
    template = b.format.jinja_path().read_text()
    s = b.build(Record("eq", "conversation", conversations=conv), random.Random(0))
    reference = tokenizer.apply_chat_template(_messages(conv), chat_template=template, tokenize=True)["input_ids"]
    assert s.input_ids == reference
    # Trained tokens decode to exactly the assistant answers, each closed by its stop token.
    trained = "".join(tokenizer.decode([i]) for i, lab in zip(s.input_ids, s.labels) if lab != M)
    assert trained == "".join(t["value"] + b.format.roles["gpt"].end for t in conv if t["from"] == "gpt")
    # Inference prompt == apply_chat_template(add_generation_prompt=True) on the turns before the last answer.
    prompt = b.chat_prompt_ids(conv[:-1], [])
    ref = tokenizer.apply_chat_template(_messages(conv[:-1]), chat_template=template, tokenize=True, add_generation_prompt=True)
    assert prompt == ref["input_ids"]


def test_plain_format_reproduces_reference_t2i_prompt(qwen):
    """DESIGN.md section 6: the reference's prompts, with the sample answer ending in <|endoftext|>."""
    b = SampleBuilder(qwen, CodeVocab.from_tokenizer(qwen, [16]), template_name="plain", cfg_dropout=0.0)
    enc = lambda text: qwen(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    cond = enc("a red circle Generate an image based on this description.<|vision_start|>")
    assert b.t2i_prompt_ids("a red circle") == cond
    assert b.t2i_prompt_ids(None) == enc("<unconditional><|vision_start|>")
    s = b.build(Record("p", "t2i", text="a red circle", images=[img([1, 2, 3, 4])]), random.Random(0))
    answer = [151665 + c for c in (1, 2, 3, 4)] + [151653, 151643]
    assert s.input_ids == cond + answer and s.labels == [M] * len(cond) + answer


def test_token_straddling_header_and_answer_is_trained(qwen):
    """Qwen2.5 merges the header's newline with an answer's leading newlines into one token; as with transformers'
    assistant-token masks, a token holding any answer character is trained."""
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\n\nblue"}]
    b = SampleBuilder(qwen, CodeVocab.from_tokenizer(qwen, [16]))
    s = b.build(Record("q", "conversation", conversations=conv), random.Random(0))
    assert s.input_ids == qwen.apply_chat_template(_messages(conv), tokenize=True)["input_ids"]
    trained = [qwen.decode([i]) for i, lab in zip(s.input_ids, s.labels) if lab != M]
    assert trained == ["\n\n\n", "blue", "<|im_end|>"]


def test_system_prompt_option_equals_template_kwarg(qwen):
    b = SampleBuilder(qwen, CodeVocab.from_tokenizer(qwen, [16]), system_prompt="You are a helpful assistant.")
    s = b.build(Record("q", "conversation", conversations=CONVERSATIONS[0]), random.Random(0))
    ref = qwen.apply_chat_template(_messages(CONVERSATIONS[0]), tokenize=True, system_prompt="You are a helpful assistant.")
    assert s.input_ids == ref["input_ids"]
    assert s.input_ids[:9] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13]  # Qwen2.5's published ids


def test_qwen_t2i_sample_ids(qwen):
    vocab = CodeVocab.from_tokenizer(qwen, [16])
    b = SampleBuilder(qwen, vocab, cfg_dropout=0.0)
    s = b.build(Record("q", "t2i", text="Hello world", images=[img([1, 2, 3, 4])]), random.Random(0))
    assert s.input_ids[:5] == [151644, 872, 198, 9707, 1879]  # <|im_start|> user \n Hello ' world'
    (start, end), = s.image_spans
    assert s.input_ids[start : end] == [151652] + [151665 + c for c in (1, 2, 3, 4)] + [151653]
    assert s.input_ids[end:] == [151645, 198]
