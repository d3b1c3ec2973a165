"""The ``reference`` chat format (issue 12, "The reference's prompts"): samples equal, token for token, the ones the
reference Uni-X's collators build (github.com/CURRENTF/Uni-X, ``uni_arch/train/data_collator.py``), and its
inference prompts are the training prefixes plus its server's answer prefix.

The expected sequences are written here from the reference's rules, with the Qwen2.5 tokenizer it uses:

* text-to-image: ``tok(caption + template + "<|vision_start|><|vision_end|><|endoftext|>")`` with the codes put
  before the last two tokens; the instruction (through ``<|vision_start|>``) masked;
* captioning: ``tok("<|vision_start|><|vision_end|>The caption of this image is:")`` with the codes after its first
  token, then ``tok(caption + "<|endoftext|>")`` tokenized on its own;
* SFT: ``<|vision_start|>`` codes ``<|vision_end|>``, then every message as ``tok("\\n" * randint(1, 3) + value)``,
  human messages masked, answers trained whole (their newlines too), no EOS.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

from data_process.schema import ImageCodes, Record
from data_process.text_tokenizer import load_qwen25_tokenizer
from modeling.vocab import IGNORE_INDEX, CodeVocab
from uni_arch.train.templates import ChatFormat, SampleBuilder, turns_from_messages

M = IGNORE_INDEX
VS, VE, EOT, IM_END = 151652, 151653, 151643, 151645
# random_choice_t2iprompt_from_list() of the reference's pretraining collator, copied by hand.
REF_T2I = [
    " Generate an image based on this description.",
    " Create an image that captures the provided description.",
    " Based on the previous text, produce a corresponding image.",
    " Please illustrate the above text with a picture.",
    " Translate the given description into a image.",
    " Construct a visual representation of the above description.",
    " Create a image that matches the text.",
    " Formulate a visual expression that reflects the narrative just provided.",
    " Give a visual depiction based on the above sentences.",
    " Create an image using the information mentioned above as guidance.",
]
CAPTION_INSTRUCTION = "The caption of this image is:"
ANSWER_PREFIX = "Based on the image and the question, my final answer is: "  # evaluation/api_server.py
IMAGE = ImageCodes(codes=[1, 2, 3, 4], grid=(2, 2), tokenizer="test-vq")
CODES = [151665 + c for c in IMAGE.codes]  # image code c is id len(tokenizer) + c, as in the reference
QA = ["What colour is it?", "Red.", "Where is it?", "On the left."]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    # Same directory as tests/test_templates.py: one conversion per session.
    return load_qwen25_tokenizer(cache_dir=tmp_path_factory.getbasetemp() / "uni_x_qwen_cache")


@pytest.fixture(scope="module")
def enc(qwen):
    return lambda text: qwen(text, add_special_tokens=False)["input_ids"]


def builder(qwen, **kwargs) -> SampleBuilder:
    return SampleBuilder(qwen, CodeVocab.from_tokenizer(qwen, [16]), template_name="reference", **kwargs)


# ------------------------------------------------------------------------ the reference's rules, by hand
def ref_t2i(enc, text: str) -> tuple[list[int], list[int]]:
    ids = enc(text + "<|vision_start|><|vision_end|><|endoftext|>")
    n = len(ids) - 2  # the codes go before <|vision_end|> and the EOS; everything before them is the instruction
    return ids[:n] + CODES + ids[n:], [M] * n + CODES + ids[n:]


def ref_caption(enc, caption: str) -> tuple[list[int], list[int]]:
    instruction, answer = enc("<|vision_start|><|vision_end|>" + CAPTION_INSTRUCTION), enc(caption + "<|endoftext|>")
    ids = instruction[:1] + CODES + instruction[1:] + answer
    return ids, [M] * (len(ids) - len(answer)) + answer


def ref_sft(enc, values: list[str], newlines: tuple[int, ...]) -> tuple[list[int], list[int]]:
    ids = [VS] + CODES + [VE]
    labels = [M] * len(ids)
    for i, (value, k) in enumerate(zip(values, newlines)):
        message = enc("\n" * k + value)
        ids, labels = ids + message, labels + (message if i % 2 else [M] * len(message))
    return ids, labels


# ----------------------------------------------------------------------------------------- the samples
def test_the_format_holds_the_reference_strings(qwen):
    fmt = builder(qwen).format
    assert fmt.t2i_instructions == tuple("{prompt}" + t for t in REF_T2I)
    assert fmt.i2t_questions == (CAPTION_INSTRUCTION,) and fmt.unconditional_prompt == "<unconditional>"
    conv = fmt.chat_layout
    assert conv.generation_prompt == "\n" + ANSWER_PREFIX and conv.images_first and fmt.split_turns
    assert {role.prefix for role in conv.roles.values()} == {("\n", "\n\n", "\n\n\n")}  # randint(1, 3) newlines
    assert builder(qwen).answer_end_id is None  # SFT answers have no end token


def test_t2i_samples_equal_the_reference_and_the_instruction_is_drawn_uniformly(qwen, enc):
    """Every sample is the reference's for one of its 10 instructions; each one is drawn with probability 1/10 from
    the sample's own rng (the same rng state gives the same instruction)."""
    b = builder(qwen, cfg_dropout=0.0)
    rec = Record("t", "t2i", text="A red circle.", images=[IMAGE])
    expected = {tuple(ref_t2i(enc, "A red circle." + t)[0]): t for t in REF_T2I}
    assert len(expected) == 10
    drawn = Counter()
    for seed in range(2000):
        s = b.build(rec, random.Random(seed))
        template = expected[tuple(s.input_ids)]  # KeyError: not a reference sample
        drawn[template] += 1
        if seed < 20:
            assert s.labels == ref_t2i(enc, "A red circle." + template)[1]
            assert s.input_ids == b.build(rec, random.Random(seed)).input_ids
    # Binomial(2000, 0.1): sd 13.4; 4 sd.
    assert len(drawn) == 10 and all(abs(n - 200) < 54 for n in drawn.values()), drawn
    first = ref_t2i(enc, "A red circle." + REF_T2I[0])[0]
    assert b.t2i_prompt_ids("A red circle.") == first[: first.index(VS) + 1]  # inference: the first instruction


def test_unconditional_prompt_is_ordinary_text(qwen, enc):
    b = builder(qwen, cfg_dropout=1.0)
    s = b.build(Record("u", "t2i", text="A red circle.", images=[IMAGE]), random.Random(0))
    assert (s.input_ids, s.labels) == ref_t2i(enc, "<unconditional>")
    assert s.input_ids[:5] == [27, 359, 45368, 29, VS]  # '<' 'un' 'conditional' '>': no special token, no markup
    # The reference's gen_img.py prompts, tokenized as one string there.
    assert b.t2i_prompt_ids(None) == enc("<unconditional><|vision_start|>")
    assert b.t2i_prompt_ids("a cat") == enc("a cat Generate an image based on this description.<|vision_start|>")


def test_caption_sample_equals_the_reference_caption_format(qwen, enc):
    """``<|vision_start|>codes<|vision_end|>The caption of this image is:`` + caption + EOS, the caption tokenized on
    its own: joined, ``:A`` would be one token (55648) instead of ``:`` ``A``."""
    b = builder(qwen, t2i_ratio=0.0)
    s = b.build(Record("c", "image_text", text="A red circle.", images=[IMAGE]), random.Random(0))
    ids, labels = ref_caption(enc, "A red circle.")
    assert s.kind == "i2t" and s.input_ids == ids
    assert ids[-6:] == [25, 32, 2518, 12671, 13, EOT] and 55648 in enc(CAPTION_INSTRUCTION + "A red circle.")
    # The image and the instruction are masked; the caption and its EOS trained. (The reference also masks the
    # caption's first token: its instruction_len is len - len(caption_ids) + 1, an off-by-one; its SFT collator
    # trains every answer token, and so do we.)
    assert s.labels == labels and s.image_spans == [(0, 6)]


@pytest.fixture(scope="module")
def sft_samples(enc):
    """Every reference rendering of the QA conversation: {ids: (newlines per turn, labels)}."""
    out = {}
    for ks in itertools.product((1, 2, 3), repeat=len(QA)):
        ids, labels = ref_sft(enc, QA, ks)
        out[tuple(ids)] = (ks, labels)
    return out


@pytest.mark.parametrize("first", ["<image>\nWhat colour is it?", "<image>What colour is it?",
                                   "What colour is it?<image>"])
def test_sft_turns_newlines_no_role_tags_no_eos(qwen, sft_samples, first):
    """Image first, then every message as 1 to 3 newlines + value (each drawn uniformly, per turn, from the
    sample's rng); no role tags, no EOS; answers trained with their newlines."""
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate([first] + QA[1:])]
    rec = Record("s", "conversation", conversations=turns, images=[IMAGE])
    b = builder(qwen)
    per_turn = [Counter() for _ in QA]
    for seed in range(300):
        s = b.build(rec, random.Random(seed))
        ks, labels = sft_samples[tuple(s.input_ids)]  # KeyError: not a reference sample
        assert s.labels == labels and s.image_spans == [(0, 6)]
        for counter, k in zip(per_turn, ks):
            counter[k] += 1
    assert EOT not in s.input_ids and IM_END not in s.input_ids
    # Binomial(300, 1/3): sd 8.2; 4 sd.
    assert all(abs(c[k] - 100) < 33 for c in per_turn for k in (1, 2, 3)), per_turn


def test_chat_prompt_is_the_training_prefix_plus_the_server_answer_prefix(qwen, enc):
    b = builder(qwen)
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(QA)]
    turns[0]["value"] = "<image>" + turns[0]["value"]
    prefix, prefix_labels = ref_sft(enc, QA[:3], (1, 1, 1))
    prompt = b.chat_prompt_ids(turns[:3], [IMAGE])
    assert prompt == prefix + enc("\n" + ANSWER_PREFIX)
    # A training sample that drew one newline per turn up to there starts with exactly this prefix, and its last
    # answer (newline included) is trained from the next token on.
    rec = Record("s", "conversation", conversations=turns, images=[IMAGE])
    sample = next(s for s in (b.build(rec, random.Random(seed)) for seed in range(500))
                  if s.input_ids[: len(prefix)] == prefix)
    assert sample.labels[: len(prefix)] == prefix_labels and prefix_labels[-1] == M and sample.labels[len(prefix)] != M
    # The reference server's text: "<|vision_start|><img><|vision_end|>\n" + question + "\n" + answer prefix.
    one = b.chat_prompt_ids(turns[:1], [IMAGE])
    assert one[:6] == [VS] + CODES + [VE] and qwen.decode(one[6:]) == "\n" + QA[0] + "\n" + ANSWER_PREFIX
    # ... whose tokenizer joined "?\n" (5267); the training prefix keeps "?" (30) and the newline apart.
    assert one[6:13] == [198, 3838, 12463, 374, 432, 30, 198]
    # reference.jinja renders the same text for apply_chat_template.
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {}}, {"type": "text", "text": QA[0]}]},
                {"role": "assistant", "content": QA[1]}, {"role": "user", "content": QA[2]}]
    assert turns_from_messages(messages) == turns[:3]
    text = qwen.apply_chat_template(messages, chat_template=b.format.jinja_path().read_text(), tokenize=False,
                                    add_generation_prompt=True)
    assert text == "<image>\n" + "\n".join(QA[:3]) + "\n" + ANSWER_PREFIX


# ------------------------------------------------------------------------- selectable: training, inference
def test_selected_at_training_and_recorded_for_inference(tmp_path):
    """``--chat_template reference`` picks the format; every checkpoint carries it (uni_x_inference.json) and
    evaluation/uni_infer.py renders its prompts with it."""
    from evaluation.uni_infer import any_modal_chat_api
    from tests.model_fixtures import make_checkpoint
    from uni_arch.train.args import DataArguments
    from uni_arch.train.builders import build_sample_builder
    from uni_arch.train.inference_spec import InferenceSpec

    with pytest.raises(ValueError, match=r"chat_template='nope'.*holds \[.*'reference'"):
        DataArguments(chat_template="nope")
    ckpt = make_checkpoint(tmp_path, "shapes")
    infer = any_modal_chat_api(ckpt)
    tokenizer, vocab = infer.pipe.tokenizer, infer.pipe.code_vocab
    trained = build_sample_builder(DataArguments(chat_template="reference"), tokenizer, vocab)
    assert trained.format.source.endswith("reference.yaml")
    old = InferenceSpec.load(ckpt)
    spec = InferenceSpec.from_builder(trained, old.image_tokenizer, tuple(old.grid))
    spec.save(ckpt)
    assert json.loads((ckpt / "uni_x_inference.json").read_text())["chat_format"]["split_turns"] is True

    infer = any_modal_chat_api(ckpt)
    assert infer.pipe.builder.format.to_dict() == trained.format.to_dict()
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    codes = list(range(16))
    messages = [{"role": "user", "content": [{"type": "image_gen", "codes": codes, "grid": [4, 4]},
                                             {"type": "text", "text": "what colour is it?"}]}]
    image_ids = [vocab.vision_start_id] + vocab.codes_to_ids(codes, 0).tolist() + [vocab.vision_end_id]
    assert infer.prompt_ids(messages) == image_ids + enc("\nwhat colour is it?") + enc("\n" + ANSWER_PREFIX)
    assert infer.pipe.builder.t2i_prompt_ids("a red circle") == enc(
        "a red circle Generate an image based on this description.") + [vocab.vision_start_id]
    assert infer.stop_ids == [infer.pipe.builder.document_eos_id]  # SFT answers have no end token of their own


def test_existing_formats_keep_their_checkpoint_copy():
    """chatml and plain: no optional key in their copy (a checkpoint's uni_x_inference.json is what it was), and
    that copy loads back to the same format."""
    for name in ("chatml", "plain"):
        fmt = ChatFormat.load(name=name)
        d = fmt.to_dict()
        assert not set(d) & set(ChatFormat.OPTIONAL) and all(set(r) == {"start", "end", "separator"}
                                                              for r in d["roles"].values())
        assert isinstance(d["t2i_instruction"], str) and fmt.chat_layout == fmt.pair_layout
        assert ChatFormat.from_dict(d, source="copy") == ChatFormat.from_dict(d, source="copy")
        assert ChatFormat.from_dict(d, source=fmt.source) == fmt
    ref = ChatFormat.load(name="reference")
    assert ChatFormat.from_dict(json.loads(json.dumps(ref.to_dict())), source=ref.source) == ref
