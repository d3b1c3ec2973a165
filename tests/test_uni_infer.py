"""evaluation/uni_infer.py on a tiny random Uni-X checkpoint + tiny random VQs (plumbing, not quality): the
constraints, CFG in one batched forward, the KV cache against full recomputation, per-sample seeds, chat with
image inputs and generated images kept as codes, and the CLI."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from evaluation.pipeline import load_pipeline
from evaluation.sampling import (
    IMAGE_DEFAULTS, REFERENCE_IMAGE_SAMPLING, TEXT_DEFAULTS, ConstrainedDecoder, RowPlan, SamplingSettings,
)
from evaluation.uni_infer import UniInfer, any_modal_chat_api
from modeling.vq.shapes_vq import ShapesVQ, ShapesVQConfig
from tests.model_fixtures import VISION_START, Biased, image_ids, make_checkpoint, text_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def infer(tmp_path_factory) -> UniInfer:
    return any_modal_chat_api(make_checkpoint(tmp_path_factory.mktemp("shapes"), "shapes"))


@pytest.fixture(scope="module")
def hq_infer(tmp_path_factory) -> UniInfer:
    return any_modal_chat_api(make_checkpoint(tmp_path_factory.mktemp("hq"), "hqvae"))


def _png_data_url(colour=(255, 0, 0), size=16) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------------- the model's padded path
def test_left_padded_cached_batch_equals_unpadded_prompts():
    """The path the sampler relies on: Uni-X all_modal_visible=0, a padded and an unpadded prompt in one batch,
    prefill + cached decoding across <|vision_start|> and codes == each prompt alone without padding or cache."""
    model = tiny_model("uni_x_amv0", "sdpa")
    g = torch.Generator().manual_seed(1)
    long, short = text_ids(7, g) + [VISION_START], text_ids(3, g) + [VISION_START]
    cont = image_ids(5, g)
    ids = torch.tensor([long, [0] * 4 + short])
    mask = torch.tensor([[1] * 8, [0] * 4 + [1] * 4])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in cont:
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = model(torch.tensor([[t], [t]]), attention_mask=mask, past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits[:, -1])
        got = torch.stack(steps, 1)
        for row, prompt in enumerate([long, short]):
            ref = model(torch.tensor([prompt + cont]), use_cache=False).logits[0, len(prompt) - 1:]
            assert (got[row] - ref).abs().max() < 1e-5


# --------------------------------------------------------------------------------------- text-to-image
def test_every_image_has_its_codes_in_range_and_decodes(infer):
    out = infer.generate_images(["a red circle", "a blue square"], num_images=3, seed=0)
    assert [len(x) for x in out] == [3, 3]
    for images in out:
        for g in images:
            assert len(g.codes) == 16 and all(0 <= c < 64 for c in g.codes)
            assert g.image.size == (16, 16) and g.grid == (4, 4)


def test_interleaved_levels_are_respected(hq_infer):
    """HQ-VAE: position p only draws from level levels[p]'s id range; 20 codes; the image decodes."""
    levels = hq_infer.pipe.levels()
    assert levels == [0, 1, 1, 1, 1] * 4
    decoder = hq_infer.decoder()
    plan = RowPlan(hq_infer.pipe.builder.t2i_prompt_ids("a cat", (2, 2)), seed=3, start_in_image=True,
                   stop_after_image=True)
    flat = SamplingSettings(temperature=5.0)  # flat distributions: every level's range gets visited
    ids = decoder.run([plan] * 1, TEXT_DEFAULTS, flat, max_new_tokens=20)[0]
    vocab = hq_infer.pipe.code_vocab
    assert len(ids) == 20
    for p, (tok, lv) in enumerate(zip(ids, levels)):
        lo, hi = vocab.level_range(lv)
        assert lo <= tok < hi, (p, tok, lv)
    images = hq_infer.generate_images("a cat", num_images=2, seed=0)[0]
    assert all(g.image.size == (8, 8) and len(g.codes) == 20 for g in images)


def test_same_seed_same_image_and_batched_equals_one_at_a_time(infer):
    """Seed per image (image i of every prompt gets seed + i): batching never changes a sample."""
    batched = infer.generate_images(["a red circle", "a blue square"], num_images=3, seed=7)
    again = infer.generate_images(["a red circle", "a blue square"], num_images=3, seed=7)
    assert [[g.codes for g in x] for x in batched] == [[g.codes for g in x] for x in again]
    for j, prompt in enumerate(["a red circle", "a blue square"]):
        for i in range(3):
            alone = infer.generate_images(prompt, num_images=1, seed=7 + i)[0][0]
            assert alone.codes == batched[j][i].codes and alone.seed == 7 + i
    small_batches = infer.generate_images(["a red circle", "a blue square"], num_images=3, seed=7, batch_size=2)
    assert [[g.codes for g in x] for x in small_batches] == [[g.codes for g in x] for x in batched]
    assert batched[0][0].codes != batched[0][1].codes  # different seeds do differ
    # one base seed per prompt (how benchmarks seed prompts that share a text): prompt j, image i -> seed[j] + i
    twins = infer.generate_images(["a red circle", "a red circle"], num_images=3, seed=[7, 10])
    assert [g.seed for g in twins[1]] == [10, 11, 12] and [g.codes for g in twins[0]] == [g.codes for g in batched[0]]
    assert [g.codes for g in twins[0]] != [g.codes for g in twins[1]]
    with pytest.raises(ValueError, match="2 bases for 1 prompts"):
        infer.generate_images("a red circle", seed=[1, 2])


def _plans(infer, cfg: bool):
    b = infer.pipe.builder
    uncond = b.t2i_prompt_ids(None, (4, 4)) if cfg else None
    return [RowPlan(b.t2i_prompt_ids(p, (4, 4)), seed=s, start_in_image=True, stop_after_image=True,
                    uncond_prompt=uncond) for s, p in enumerate(["a red circle", "a big green triangle on grey"])]


def test_cfg_scale_one_equals_the_conditional_only_sampler(infer):
    decoder = infer.decoder()
    ids_c, logits_c = decoder.run(_plans(infer, False), TEXT_DEFAULTS, IMAGE_DEFAULTS, 1.0, 16, return_logits=True)
    ids_g, logits_g = decoder.run(_plans(infer, True), TEXT_DEFAULTS, IMAGE_DEFAULTS, 1.0, 16, return_logits=True)
    assert ids_c == ids_g
    for a, b in zip(logits_c, logits_g):
        assert len(a) == len(b) == 16
        fin = torch.isfinite(torch.stack(a))
        assert torch.equal(fin, torch.isfinite(torch.stack(b)))
        assert (torch.stack(a)[fin] - torch.stack(b)[fin]).abs().max() < 1e-5


def test_cached_equals_recomputed_and_cfg_is_the_formula(infer):
    """The KV-cache loop == recomputing the whole sequence each step; guided logits == uncond + s (cond - uncond)
    from separate unbatched, uncached forwards."""
    decoder, s = infer.decoder(), 3.0
    ids_a, logits_a = decoder.run(_plans(infer, True), TEXT_DEFAULTS, IMAGE_DEFAULTS, s, 16, return_logits=True)
    ids_b, logits_b = decoder.run(_plans(infer, True), TEXT_DEFAULTS, IMAGE_DEFAULTS, s, 16, use_cache=False,
                                  return_logits=True)
    assert ids_a == ids_b
    model, allowed = infer.pipe.model, decoder._level_LV[0]
    for plan, ids, steps, recomputed in zip(_plans(infer, True), ids_a, logits_a, logits_b):
        assert (torch.stack(steps) - torch.stack(recomputed)).nan_to_num(0, 0, 0).abs().max() < 1e-4
        with torch.no_grad():
            cond = model(torch.tensor([plan.prompt + ids[:-1]]), use_cache=False).logits[0, len(plan.prompt) - 1:]
            unc = model(torch.tensor([plan.uncond_prompt + ids[:-1]]),
                        use_cache=False).logits[0, len(plan.uncond_prompt) - 1:]
        want = (unc + s * (cond - unc))[:, allowed]
        assert (torch.stack(steps)[:, allowed] - want).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------ chat
def test_chat_with_image_inputs_returns_text_only(infer, tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(path)
    Image_pil = Image.new("RGB", (16, 16), (0, 255, 0))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_data_url()}}, {"type": "image", "image": str(path)},
        {"type": "image", "image": Image_pil}, {"type": "text", "text": "What colour is the shape?"}]}]
    reply = infer.chat(messages, max_new_tokens=12, seed=1)
    vocab = infer.pipe.code_vocab
    assert isinstance(reply.text, str) and 0 < len(reply.ids) <= 12 and not reply.images
    assert not any(t >= vocab.image_offset or t in (vocab.vision_start_id, vocab.vision_end_id) for t in reply.ids)
    assert infer.prompt_ids(messages).count(vocab.vision_start_id) == 3  # three images in one turn
    assert infer.chat(messages, max_new_tokens=12, seed=1).ids == reply.ids  # same seed, same reply


def test_text_mode_never_emits_image_ids_even_when_the_model_wants_them(infer):
    vocab = infer.pipe.code_vocab
    wanted = list(range(vocab.image_offset, infer.pipe.model.config.vocab_size)) + [vocab.vision_start_id,
                                                                                   vocab.vision_end_id]
    biased = UniInfer(infer.pipe)
    biased.pipe = type(infer.pipe)(**{**vars(infer.pipe), "model": Biased(infer.pipe.model, wanted, 100.0)})
    reply = biased.chat([{"role": "user", "content": "hello"}], max_new_tokens=10, seed=0)
    assert len(reply.ids) > 0 and not any(t in wanted for t in reply.ids)


def test_auto_draw_switches_to_image_mode_and_the_image_stays_as_codes(infer):
    """A model that wants <|vision_start|> opens an image: exactly 16 codes, a forced <|vision_end|>, back to text;
    the next turn carries the generated image as those codes (not re-encoded)."""
    vocab = infer.pipe.code_vocab
    biased = UniInfer(type(infer.pipe)(**{**vars(infer.pipe),
                                          "model": Biased(infer.pipe.model, [vocab.vision_start_id], 30.0)}))
    messages = [{"role": "user", "content": "draw a red circle"}]
    reply = biased.chat(messages, draw="auto", max_new_tokens=40, seed=0)
    start = reply.ids.index(vocab.vision_start_id)
    block = reply.ids[start:start + 18]
    assert all(vocab.is_image_id(t) for t in block[1:17]) and block[17] == vocab.vision_end_id
    assert reply.images and reply.images[0].image.size == (16, 16) and len(reply.images[0].codes) == 16
    short = biased.chat(messages, draw="auto", max_new_tokens=3, seed=0)  # out of budget mid-image: completed
    assert len(short.ids) == 18 and short.ids[-1] == vocab.vision_end_id and len(short.images) == 1
    history = messages + [reply.message, {"role": "user", "content": "and now?"}]
    ids = infer.prompt_ids(history)
    codes = vocab.codes_to_ids(reply.images[0].codes).tolist()
    assert any(ids[i:i + 16] == codes for i in range(len(ids)))


def test_chat_cfg_twin_guides_each_image_from_the_bare_unconditional_prompt(infer):
    """In a reply with two images, the twin row follows only the image blocks and forgets the first image: the
    second image's guided logits == uncond + s (cond - uncond) with uncond = t2i_prompt_ids(None) + its own codes."""
    vocab, b, s = infer.pipe.code_vocab, infer.pipe.builder, 2.0
    model = Biased(infer.pipe.model, [vocab.vision_start_id], 30.0)
    decoder = ConstrainedDecoder(model, vocab, [0] * 16, [], infer.stop_ids, infer.pad_id)
    head = b.t2i_prompt_ids(None, (4, 4))[:-1]  # without <|vision_start|>: the row decides when to draw
    prompt = infer.prompt_ids([{"role": "user", "content": "two pictures please"}])
    plan = RowPlan(prompt, seed=4, allow_draw=True, uncond_prompt=head)
    (ids,), (steps,) = decoder.run([plan], TEXT_DEFAULTS, IMAGE_DEFAULTS, s, 36, return_logits=True)
    assert ids[0] == ids[18] == vocab.vision_start_id and ids[17] == ids[35] == vocab.vision_end_id
    assert len(steps) == 1 + 16 + 1 + 16  # sampled steps only: forced <|vision_end|> draws nothing
    second = ids[19:35]
    with torch.no_grad():
        cond = model(input_ids=torch.tensor([prompt + ids[:34]]), use_cache=False).logits[0, len(prompt) + 18:]
        unc = model(input_ids=torch.tensor([head + [vocab.vision_start_id] + second[:-1]]),
                    use_cache=False).logits[0, len(head):]
    allowed = decoder._level_LV[0]
    want = (unc + s * (cond - unc))[:, allowed]
    assert (torch.stack(steps[18:])[:, allowed] - want).abs().max() < 1e-4


def test_draw_always_starts_with_an_image_and_guides_it(infer):
    reply = infer.chat([{"role": "user", "content": [{"type": "image", "image": _png_data_url()},
                                                     {"type": "text", "text": "make it blue"}]}],
                       draw="always", max_new_tokens=20, seed=0, cfg_scale=3.0)
    vocab = infer.pipe.code_vocab
    assert reply.ids[0] == vocab.vision_start_id and reply.ids[17] == vocab.vision_end_id
    assert reply.parts[0]["type"] == "image_gen" and len(reply.parts[0]["codes"]) == 16


def test_prompt_longer_than_the_context_is_refused(infer):
    context = infer.pipe.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's context of {context} tokens"):
        infer.chat([{"role": "user", "content": "red " * context}], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"messages\[1\] must be a message object"):
        infer.prompt_ids([{"role": "user", "content": "hi"}, "hello"])


def test_bad_image_inputs_are_named(infer):
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: remote image URLs"):
        infer.prompt_ids([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}])
    with pytest.raises(ValueError, match=r"content\[1\]: not a decodable image"):
        infer.prompt_ids([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                       {"type": "image", "image": "data:image/png;base64,AAAA"}]}])


def test_load_pipeline_refuses_a_foreign_image_tokenizer(infer, tmp_path):
    vq = ShapesVQ(ShapesVQConfig(image_size=16, channels=(8, 16, 32), codebook_size=32, code_dim=8))
    vq.save_pretrained(tmp_path / "vq32")
    with pytest.raises(ValueError, match=r"levels \[32\].*has levels \[64\]"):
        load_pipeline(infer.pipe.checkpoint, image_tokenizer_path=str(tmp_path / "vq32"))


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_generate_writes_decodable_pngs_and_settings(infer, tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, str(ROOT / "evaluation" / "uni_infer.py"), "generate", "--checkpoint",
           infer.pipe.checkpoint, "--prompt", "a photo of a red circle", "--num_images", "3", "--seed", "0",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    for p in pngs:
        with Image.open(p) as im:
            im.load()
            assert im.size == (16, 16)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["checkpoint"] == str(Path(infer.pipe.checkpoint).resolve())
    assert [x["seed"] for x in settings["images"]] == [0, 1, 2] and settings["cfg_scale"] == 4.0
    # the CLI's images are the Python API's for the same seeds
    api = infer.generate_images("a photo of a red circle", num_images=3, seed=0)[0]
    assert [x["codes"] for x in settings["images"]] == [g.codes for g in api]


def test_cli_chat_answers_about_an_image(infer, tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "scene.png")
    cmd = [sys.executable, str(ROOT / "evaluation" / "uni_infer.py"), "chat", "--checkpoint", infer.pipe.checkpoint,
           "--message", "What colour is the shape?", "--image", str(tmp_path / "scene.png"), "--max_new_tokens", "6",
           "--seed", "3"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "scene.png")},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    assert proc.stdout.strip() == infer.chat(messages, max_new_tokens=6, seed=3).text.strip()


def test_top_k_is_scaled_to_the_codebook(infer):
    ref = REFERENCE_IMAGE_SAMPLING
    assert ref.k_for(8192) == 4096 and ref.k_for(512) == 256  # the reference's 4096 of 8192
    assert IMAGE_DEFAULTS.k_for(512) == 0  # the default does not truncate
    assert SamplingSettings(top_k=7, top_k_fraction=0.5).k_for(512) == 7  # an explicit top_k wins
    # 1 of 64 codes: sampling at any temperature is the greedy choice
    one = SamplingSettings(temperature=3.0, top_k_fraction=1 / 64)
    greedy = SamplingSettings(temperature=0.0)
    a = infer.generate_images("a red circle", num_images=2, seed=0, sampling=one)[0]
    b = infer.generate_images("a red circle", num_images=2, seed=5, sampling=greedy)[0]
    assert [g.codes for g in a] == [g.codes for g in b]
    c = infer.generate_images("a red circle", num_images=2, seed=0, sampling=SamplingSettings(temperature=3.0))[0]
    assert [g.codes for g in c] != [g.codes for g in a]
