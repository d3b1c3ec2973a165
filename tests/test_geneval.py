"""GenEval benchmark (evaluation/benchmarks/geneval.py): metadata validation, the resumable official layout, every
scoring rule against hand-made detections with known verdicts, the summary arithmetic, and the transformers scorer
end to end on tiny random-weight Mask2Former and CLIP models saved to (and loaded from) local folders."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.benchmarks import geneval as ge
from evaluation.benchmarks.geneval import GenEvalRules, Instance, judge

DOG = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
TWO = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
       "prompt": "a photo of a dog and a cat"}
COUNT2 = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
          "prompt": "a photo of two dogs"}
RED_DOG = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"}
DOG_RIGHT_OF_CAT = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                                   {"class": "dog", "count": 1, "position": ["right of", 0]}],
                    "prompt": "a photo of a dog right of a cat"}
RED_DOG_BLUE_CAT = {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                                     {"class": "cat", "count": 1, "color": "blue"}],
                    "prompt": "a photo of a red dog and a blue cat"}


@dataclass(frozen=True)
class Painted(Instance):
    """A hand-made detection with the colour a colour classifier would see in it."""

    color: str = ""


def inst(label: str, score: float = 0.95, box=(0, 0, 10, 10), color: str = "") -> Painted:
    return Painted(label, tuple(float(v) for v in box), score, color=color)


class ColorsFrom:
    """A colour function reading the colour each hand-made detection was given; records what it was asked."""

    def __init__(self):
        self.asked: list[tuple[str, int]] = []

    def __call__(self, cls: str, insts: list[Painted]) -> list[str]:
        self.asked.append((cls, len(insts)))
        return [i.color for i in insts]


def verdict(instances, meta, rules=GenEvalRules()):
    return judge(instances, meta, ColorsFrom(), rules)


# ------------------------------------------------------------------------------------------------ metadata
def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_metadata_reads_official_lines(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(m) for m in (DOG, COUNT2, DOG_RIGHT_OF_CAT)] + [""])
    assert ge.load_metadata(path) == [DOG, COUNT2, DOG_RIGHT_OF_CAT]


@pytest.mark.parametrize("line, field", [
    ("{not json", "<json>"),
    (json.dumps({k: v for k, v in DOG.items() if k != "tag"}), "tag"),
    (json.dumps({**DOG, "prompt": 3}), "prompt"),
    (json.dumps({**DOG, "include": []}), "include"),
    (json.dumps({**DOG, "include": [{"class": "dog", "count": "1"}]}), r"include\[0\]\.count"),
    (json.dumps({**DOG, "include": [{"count": 1}]}), r"include\[0\]\.class"),
    (json.dumps({**DOG, "include": [{"class": "dog", "count": 1, "color": "teal"}]}), r"include\[0\]\.color"),
    (json.dumps({**DOG, "include": [{"class": "dog", "count": 1, "position": ["right of", 0]}]}),
     r"include\[0\]\.position"),
    (json.dumps({**DOG, "exclude": {"class": "dog", "count": 2}}), "exclude"),
    (json.dumps({**DOG, "exclude": [{"class": "dog", "count": 0}]}), r"exclude\[0\]\.count"),
])
def test_load_metadata_errors_name_file_line_and_field(tmp_path, line, field):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(DOG), "", line])
    with pytest.raises(ValueError, match=rf"m\.jsonl:3: {field}"):
        ge.load_metadata(path)


# ---------------------------------------------------------------------------------------------- generation
class FakeGenerator:
    """Solid images whose grey level encodes (call, prompt, sample); can fail on a chosen call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, prompts: list[str], n: int, numbers: list[int]) -> list[list[Image.Image]]:
        self.calls.append(list(prompts))
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("interrupted")
        return [[Image.new("RGB", (8, 8), (10 * j + i, 0, 0)) for i in range(n)] for j in range(len(prompts))]


def test_generate_writes_official_layout_and_resumes(tmp_path):
    meta = [{**DOG, "prompt": f"a photo of a dog {k}"} for k in range(5)]
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ge.generate(FakeGenerator(fail_on_call=2), meta, out, n_samples=3, batch_prompts=2)
    # The first batch is on disk in full; the interrupted one left nothing that looks done.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000", "00001"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert ge.missing_samples(out, meta, 3) == [2, 3, 4]
    gen = FakeGenerator()
    assert ge.generate(gen, meta, out, n_samples=3, batch_prompts=2) == [2, 3, 4]
    assert gen.calls == [[m["prompt"] for m in meta[2:4]], [meta[4]["prompt"]]]
    for k in range(5):
        folder = out / f"{k:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == meta[k]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert ge.generate(FakeGenerator(), meta, out, n_samples=3) == []  # nothing twice
    # A lost sample makes its prompt incomplete; it is redrawn whole and the folder replaced.
    (out / "00003" / "samples" / "0001.png").unlink()
    gen = FakeGenerator()
    assert ge.generate(gen, meta, out, n_samples=3) == [3]
    assert gen.calls == [[meta[3]["prompt"]]] and (out / "00003" / "samples" / "0001.png").is_file()
    # More samples per prompt than on disk: every prompt is incomplete.
    assert ge.missing_samples(out, meta, 4) == [0, 1, 2, 3, 4]


def test_missing_samples_refuses_another_metadata_file(tmp_path):
    ge.write_prompt_samples(tmp_path, 0, DOG, [Image.new("RGB", (4, 4))])
    with pytest.raises(ValueError, match=r"00000/metadata\.jsonl holds 'a photo of a dog' but metadata line 1"):
        ge.missing_samples(tmp_path, [TWO], 1)


def test_generate_checks_the_image_counts(tmp_path):
    with pytest.raises(ValueError, match="expected 2 each"):
        ge.generate(lambda prompts, n, numbers: [[Image.new("RGB", (4, 4))] for _ in prompts], [DOG], tmp_path,
                    n_samples=2)


# -------------------------------------------------------------------------------------------------- rules
def test_single_object_threshold_is_strict():
    assert verdict([inst("dog", 0.31)], DOG).correct
    v = verdict([inst("dog", 0.3), inst("cat", 0.9)], DOG)
    assert not v.correct and v.reason == "expected dog>=1, found 0"
    assert v.details == {"cat": [[0.0, 0.0, 10.0, 10.0, 0.9]]}  # kept detections only, official [box + score]


def test_two_object():
    assert verdict([inst("cat", 0.5), inst("dog", 0.8)], TWO).correct
    v = verdict([inst("dog", 0.8), inst("dog", 0.7)], TWO)
    assert not v.correct and v.reason == "expected cat>=1, found 0"


def test_counting_uses_the_090_threshold_and_the_exclude_clause():
    two = [inst("dog", 0.95), inst("dog", 0.91)]
    assert verdict(two + [inst("dog", 0.85)], COUNT2).correct  # the third is below 0.9: not counted
    v = verdict(two + [inst("dog", 0.92)], COUNT2)
    assert not v.correct and v.reason == "expected dog<3, found 3"
    v = verdict([inst("dog", 0.95), inst("dog", 0.89)], COUNT2)
    assert not v.correct and v.reason == "expected dog>=2, found 1"
    # The same detections under another tag count at 0.3: the 0.89 dog and the 0.85 one are both kept.
    assert not verdict(two + [inst("dog", 0.85)], {**COUNT2, "tag": "two_object"}).correct


def test_colors_read_only_the_most_confident_objects():
    colors = ColorsFrom()
    v = judge([inst("dog", 0.6, color="red"), inst("dog", 0.9, color="blue"), inst("cat", 0.9, color="red")],
              RED_DOG, colors)
    assert not v.correct and v.reason == "expected red dog>=1, found 0 red"
    assert colors.asked == [("dog", 1)]  # only the top dog is classified; cats never are
    assert verdict([inst("dog", 0.9, color="red"), inst("dog", 0.6, color="blue")], RED_DOG).correct


@pytest.mark.parametrize("dx, threshold, correct", [
    (4.5, 0.1, True),    # revised offset (4.5 - 0.1 * 20) / 4.5 = 0.56 > 0.5
    (4.0, 0.1, False),   # exactly 0.5: not "right of"
    (3.0, 0.1, False),   # inside the 0.1 margin ...
    (3.0, 0.0, True),    # ... which is all that fails it
    (-10.0, 0.1, False),  # left of, not right of
])
def test_position_margin(dx, threshold, correct):
    dets = [inst("cat", 0.9, (0, 0, 10, 10)), inst("dog", 0.9, (dx, 0, dx + 10, 10))]
    v = verdict(dets, DOG_RIGHT_OF_CAT, GenEvalRules(position_threshold=threshold))
    assert v.correct is correct
    if not correct:
        assert v.reason.startswith("expected dog right of target")


def test_position_without_target():
    v = verdict([inst("dog", 0.9, (30, 0, 40, 10))], DOG_RIGHT_OF_CAT)
    assert not v.correct and v.reason.splitlines() == ["expected cat>=1, found 0", "no target for dog to be right of"]


def test_color_attr_binds_each_colour_to_its_object():
    assert verdict([inst("dog", color="red"), inst("cat", color="blue")], RED_DOG_BLUE_CAT).correct
    v = verdict([inst("dog", color="blue"), inst("cat", color="red")], RED_DOG_BLUE_CAT)
    assert not v.correct and v.reason.splitlines() == ["expected red dog>=1, found 0 red",
                                                       "expected blue cat>=1, found 0 blue"]


def test_at_most_16_objects_per_class():
    many = [inst("dog", 0.5 + 0.01 * k) for k in range(20)]
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "dog", "count": 17}],
            "prompt": "p"}
    v = verdict(many, {**meta, "tag": "two_object"})
    assert v.correct and len(v.details["dog"]) == 16  # without the cap the exclude clause (20 >= 17) would fail it
    assert [d[4] for d in v.details["dog"]] == sorted((0.5 + 0.01 * k for k in range(4, 20)), reverse=True)
    assert not verdict(many, meta, GenEvalRules(max_objects=20)).correct


def test_summary_is_the_mean_of_tag_accuracies():
    def rec(tag, correct, prompt):
        return {"tag": tag, "correct": correct, "metadata": json.dumps({"prompt": prompt})}

    results = ([rec("single_object", True, "a")] * 4                                        # 4 / 4
               + [rec("counting", c, "b") for c in (True, False, False, False)]              # 1 / 4
               + [rec("counting", False, "c")] * 4                                          # 0 / 4 -> counting 1/8
               + [rec("colors", c, "d") for c in (True, True, False, False)])                # 2 / 4
    s = ge.summarize(results)
    assert s["tags"]["single_object"] == {"accuracy": 1.0, "correct": 4, "images": 4}
    assert s["tags"]["counting"]["accuracy"] == pytest.approx(1 / 8)
    assert s["overall"] == pytest.approx((1.0 + 1 / 8 + 0.5) / 3)  # not 7 / 16, the image mean
    assert s["correct_images"] == pytest.approx(7 / 16)
    assert s["prompts"] == 4 and s["correct_prompts"] == pytest.approx(3 / 4)  # prompt c has no correct image
    assert s["tags_missing"] == ["two_object", "position", "color_attr"]
    assert "Overall score (avg. over tasks): 0.54167" in ge.format_summary(s)


def test_detector_labels_in_geneval_spelling():
    assert [ge.geneval_name(x) for x in ("mouse", "Remote", "keyboard", "dining_table", "hair drier")] == [
        "computer mouse", "tv remote", "computer keyboard", "dining table", "hair drier"]


# ------------------------------------------------------------------------- tiny transformers models end to end
LABELS = ["person", "dog", "cat", "mouse"]


def build_tiny_models(root: Path) -> tuple[Path, Path]:
    """Random-weight Mask2Former (its class head biased so every query says "dog" with confidence) and CLIP with a
    character-level CLIP tokenizer, saved as local model folders."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, Mask2FormerConfig,
                              Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil, SwinConfig)

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, num_queries=8, id2label=dict(enumerate(LABELS)),
                            label2id={x: i for i, x in enumerate(LABELS)})
    det = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        det.class_predictor.weight.zero_()
        det.class_predictor.bias.copy_(torch.tensor([0.0, 12.0, 0.0, 0.0, 0.0]))  # "dog" ~1.0; last = no object
    det_dir, clip_dir = root / "mask2former", root / "clip"
    det.save_pretrained(det_dir)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(det_dir)

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.printable.strip():
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(clip_dir)
    clip_cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(clip_cfg).save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    return det_dir, clip_dir


class Spy:
    """Counts the images a scorer is asked about."""

    def __init__(self, scorer):
        self.scorer, self.calls = scorer, 0
        self.labels, self.describe = scorer.labels, scorer.describe

    def __call__(self, image, meta):
        self.calls += 1
        return self.scorer(image, meta)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def test_color_crops_are_masked_grey_and_prompts_are_the_official_templates(tiny_models):
    scorer = ge.GenEvalScorer.from_paths(*tiny_models, device="cpu")
    seen_images, seen_texts = [], []
    image_processor, tokenizer = scorer.clip_processor, scorer.tokenizer
    scorer.clip_processor = lambda images, **kw: seen_images.extend(images) or image_processor(images=images, **kw)
    scorer.tokenizer = lambda texts, **kw: seen_texts.extend(texts) or tokenizer(texts, **kw)
    image = Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8))
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 10:14] = True
    mask[9, 18] = True  # the box is the mask's extent: x 10..19, y 5..10
    colors = scorer.classify_colors(image, "dog", [Instance("dog", (10.0, 5.0, 19.0, 10.0), 0.9, mask)])
    assert len(colors) == 1 and colors[0] in ge.COLORS
    crop = np.asarray(seen_images[0])
    assert crop.shape == (5, 9, 3)
    assert (crop[mask[5:10, 10:19]] == 200).all() and (crop[~mask[5:10, 10:19]] == 0x99).all()
    assert len(seen_texts) == 30 and seen_texts[:3] == [
        "a photo of a red dog", "a photo of a red-colored dog", "a photo of a red object"]
    assert seen_texts[-1] == "a photo of a white object"
    scorer.classify_colors(image, "dog", [Instance("dog", (10.0, 5.0, 19.0, 10.0), 0.9, mask)])
    assert len(seen_texts) == 30  # the text side is computed once per class


def test_transformers_scorer_end_to_end_and_resume(tmp_path, tiny_models):
    from modeling.vq.base import file_hash

    det_dir, clip_dir = tiny_models
    scorer = ge.GenEvalScorer.from_paths(det_dir, clip_dir, device="cpu")
    assert scorer.labels == ["person", "dog", "cat", "computer mouse"]
    person = {**DOG, "include": [{"class": "person", "count": 1}], "prompt": "a photo of a person"}
    meta = [DOG, person, RED_DOG, {**COUNT2, "exclude": [{"class": "dog", "count": 30}]}]
    rng = np.random.default_rng(0)
    out = tmp_path / "geneval"
    ge.generate(lambda prompts, n, numbers: [[Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
                                     for _ in range(n)] for _ in prompts], meta, out, n_samples=2)
    spy = Spy(scorer)
    summary = ge.score_folder(out, spy)
    assert spy.calls == 8
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["filename"] for r in rows] == [f"{k:05d}/samples/{i:04d}.png" for k in range(4) for i in range(2)]
    for r in rows:
        assert set(r) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
        assert json.loads(r["metadata"]) == meta[int(r["filename"][:5])]
        details = json.loads(r["details"])
        assert set(details) <= {"dog"} and all(len(box) == 5 for box in details.get("dog", []))
    by_prompt = {r["prompt"]: r for r in rows}
    # Every query says "dog" with class probability ~1 (x mean mask probability > 0.5): dogs found, no person.
    assert by_prompt[DOG["prompt"]]["correct"] and len(json.loads(by_prompt[DOG["prompt"]]["details"])["dog"]) == 8
    assert by_prompt[person["prompt"]]["reason"] == "expected person>=1, found 0"
    assert by_prompt[RED_DOG["prompt"]]["correct"] == (by_prompt[RED_DOG["prompt"]]["reason"] == "")
    assert summary["images"] == 8 and set(summary["tags"]) == {"single_object", "colors", "counting"}
    assert json.loads((out / "results.json").read_text()) == summary
    assert summary["scorer"]["detector"]["weights_sha256"] == file_hash(det_dir / "model.safetensors")
    assert summary["scorer"]["clip"]["weights_sha256"] == file_hash(clip_dir / "model.safetensors")
    assert summary["scorer"]["rules"] == {"threshold": 0.3, "counting_threshold": 0.9, "max_objects": 16,
                                          "position_threshold": 0.1}

    # A rerun scores nothing; a torn last line (killed mid-write) is dropped and only that image is rescored.
    spy = Spy(scorer)
    assert ge.score_folder(out, spy) == summary and spy.calls == 0
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text[:text.rstrip("\n").rfind("\n") + 1] + '{"filename": "000')
    spy = Spy(scorer)
    assert ge.score_folder(out, spy) == summary and spy.calls == 1
    assert (out / "results.jsonl").read_text() == text


def test_score_folder_refuses_classes_the_detector_does_not_know(tmp_path):
    class Labels:
        labels = ["dog"]

        def __call__(self, image, meta):  # pragma: no cover - never reached
            raise AssertionError

    ge.write_prompt_samples(tmp_path, 0, TWO, [Image.new("RGB", (4, 4))])
    with pytest.raises(ValueError, match=r"classes \['cat'\] are not among the detector's labels"):
        ge.score_folder(tmp_path, Labels())


def test_generate_numbers_prompts_by_their_metadata_line_whatever_the_batch(tmp_path):
    """Two prompts with the same text get different numbers (so different seeds); a resumed run numbers the
    remaining prompts as the first run would have."""
    meta = [DOG, DOG, RED_DOG]
    calls = []

    def fake(prompts, n, numbers):
        calls.append(list(numbers))
        return [[Image.new("RGB", (4, 4))] * n for _ in prompts]

    ge.generate(fake, meta, tmp_path, n_samples=1, batch_prompts=2, indices=[0, 2])
    ge.generate(fake, meta, tmp_path, n_samples=1, batch_prompts=2)  # resumes: only line 1 is missing
    assert calls == [[0, 2], [1]]
