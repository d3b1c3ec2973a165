"""A checkpoint knows how to be used: every save (final and ``checkpoint-N/``) carries ``uni_x_inference.json`` and
``load_pipeline`` needs nothing else; a mismatching image tokenizer fails naming both vocabularies."""

from __future__ import annotations

import json
import shutil

import pytest

from evaluation.pipeline import load_pipeline
from modeling.vq.shapes_vq import ShapesVQ, ShapesVQConfig
from uni_arch.train.args import parse_args
from uni_arch.train.hf_trainer import main
from uni_arch.train.inference_spec import INFERENCE_SPEC_NAME, InferenceSpec
from uni_arch.train.synthetic import make_world

TINY_VQ = dict(image_size=16, channels=(8, 16, 32), codebook_size=64, code_dim=8)  # 4x4 grid, 64 codes


def tiny_vq(path, **overrides):
    import torch

    torch.manual_seed(0)
    vq = ShapesVQ(ShapesVQConfig(**{**TINY_VQ, **overrides})).eval()
    vq.save_pretrained(path)
    return vq


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run with a save at step 2: ``checkpoint-2/`` and the final directory."""
    root = tmp_path_factory.mktemp("ckpt")
    world = make_world(root / "world", n_records=60, grid=(4, 4), codebook=64)
    world.pop("image_level_sizes")
    tiny_vq(root / "vq")
    out = root / "run"
    argv = ["--output_dir", str(out), "--use_cpu", "true", "--max_steps", "3", "--save_strategy", "steps",
            "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "3e-3", "--model_max_length", "256",
            "--report_to", "none", "--write_loss_curves", "false", "--seed", "0", "--system_prompt", "Be brief.",
            "--image_tokenizer", "shapes", "--image_tokenizer_path", str(root / "vq")]
    for k, v in world.items():
        argv += [f"--{k}", v]
    main(*parse_args(argv))
    return root, out


def test_final_and_intermediate_checkpoints_carry_the_spec_and_load(trained):
    root, out = trained
    for ckpt in (out / "checkpoint-2", out):
        assert (ckpt / INFERENCE_SPEC_NAME).is_file(), ckpt
        spec = InferenceSpec.load(ckpt)
        assert spec.image_tokenizer.kind == "shapes" and spec.image_tokenizer.path == str((root / "vq").resolve())
        assert spec.grid == [4, 4] and spec.system_prompt == "Be brief." and spec.chat_format["roles"]
        pipe = load_pipeline(ckpt)
        assert pipe.grid == (4, 4) and pipe.levels() == [0] * 16
        assert pipe.image_tokenizer.checkpoint_hash == spec.image_tokenizer.hash
        assert pipe.code_vocab == pipe.model.config.code_vocab
        # the renderer is training's, with the run's system prompt
        text = pipe.tokenizer.decode(pipe.builder.t2i_prompt_ids("a red circle"))
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|vision_start|>")


def test_spec_carries_the_format_itself_not_a_file_name(trained, tmp_path):
    """Prompts keep rendering as in training even when the template files are gone or changed."""
    _, out = trained
    ckpt = tmp_path / "moved"
    shutil.copytree(out / "checkpoint-2", ckpt)
    raw = json.loads((ckpt / INFERENCE_SPEC_NAME).read_text())
    raw["chat_format"]["t2i_instruction"] = "Draw: {prompt}"
    (ckpt / INFERENCE_SPEC_NAME).write_text(json.dumps(raw))
    pipe = load_pipeline(ckpt)
    assert "Draw: a cat" in pipe.tokenizer.decode(pipe.builder.t2i_prompt_ids("a cat"))


def test_overrides_beat_the_checkpoint(trained):
    _, out = trained
    pipe = load_pipeline(out, system_prompt="Other.", grid=(4, 4))
    assert "Other." in pipe.tokenizer.decode(pipe.builder.chat_prompt_ids([{"from": "human", "value": "hi"}], []))
    with pytest.raises(TypeError, match="unknown override.*colour"):
        load_pipeline(out, colour="red")


def test_image_tokenizer_vocabulary_mismatch_names_both(trained, tmp_path):
    _, out = trained
    tiny_vq(tmp_path / "vq128", codebook_size=128)
    with pytest.raises(ValueError, match=r"levels \[128\].*config.code_vocab\) has levels \[64\]"):
        load_pipeline(out, image_tokenizer_path=str(tmp_path / "vq128"))


def test_changed_image_tokenizer_weights_are_refused(trained, tmp_path):
    """Same vocabulary, other weights (e.g. the VQ retrained in place): the recorded hash catches it."""
    root, out = trained
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt, ignore=shutil.ignore_patterns("checkpoint-*"))
    raw = json.loads((ckpt / INFERENCE_SPEC_NAME).read_text())
    raw["image_tokenizer"]["hash"] = "0" * 12
    (ckpt / INFERENCE_SPEC_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="hash .* trained with 000000000000"):
        load_pipeline(ckpt)


def test_spec_of_another_vocabulary_is_refused(trained, tmp_path):
    _, out = trained
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt, ignore=shutil.ignore_patterns("checkpoint-*"))
    raw = json.loads((ckpt / INFERENCE_SPEC_NAME).read_text())
    raw["code_vocab"]["level_sizes"] = [128]
    (ckpt / INFERENCE_SPEC_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"code vocabulary .*\[128\].* but config.code_vocab is .*\[64\]"):
        load_pipeline(ckpt)


def test_bad_spec_file_names_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=INFERENCE_SPEC_NAME):
        InferenceSpec.load(tmp_path)
    (tmp_path / INFERENCE_SPEC_NAME).write_text(json.dumps({"version": 1, "code_vocab": {}, "colour": 1}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\].*missing field\(s\) \['chat_format'"):
        InferenceSpec.load(tmp_path)


def test_checkpoint_saved_before_the_spec_loads_from_run_args(trained, tmp_path):
    _, out = trained
    ckpt = tmp_path / "old"
    shutil.copytree(out, ckpt, ignore=shutil.ignore_patterns("checkpoint-*", INFERENCE_SPEC_NAME))
    pipe = load_pipeline(ckpt)
    assert pipe.grid == (4, 4) and pipe.builder.system_prompt == "Be brief."
    assert pipe.builder.t2i_prompt_ids("a cat") == load_pipeline(out).builder.t2i_prompt_ids("a cat")
