"""Argument groups: stated precedence (defaults < YAML < CLI), reference knob names, errors that name the field."""

from pathlib import Path

import pytest
import torch

from uni_arch.train.args import parse_args

BASE = ["--model_config", "cfg.json", "--output_dir", "out", "--use_cpu", "true"]


def _yaml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "preset.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_defaults_yaml_cli(tmp_path):
    cfg = _yaml(tmp_path, "learning_rate: 0.001\nuse_data_packing: 1\nmax_steps: 7\nt2i_ratio: 0.25\n")
    m, d, t = parse_args(["--config", cfg, *BASE, "--learning_rate", "0.01"])
    assert t.learning_rate == 0.01  # CLI beats YAML
    assert t.max_steps == 7 and d.use_data_packing == 1 and d.t2i_ratio == 0.25  # YAML beats defaults
    assert d.model_max_length == 2048 and m.unfreeze_keys == "train-all"  # defaults
    assert t.remove_unused_columns is False


@pytest.mark.parametrize(
    "spec, custom_cls, variant",
    [("x", "uni_qwen", "uni_x"), ("unix", "uni_qwen", "uni_x"), ("mot", "uni_qwen", "mot"), ("moe", "uni_qwen", "moe"),
     ("x", "none", "dense")],
)
def test_reference_variant_mapping(spec, custom_cls, variant):
    m, _, _ = parse_args([*BASE, "--model_spec_module", spec, "--custom_cls", custom_cls])
    assert m.variant == variant


def test_reference_knob_names_exist():
    m, d, t = parse_args([
        *BASE, "--data_path", "a/*.jsonl:0.7,b:0.3", "--streaming_data", "1", "--data_percentage", "0.5",
        "--shuffle_seed", "3", "--vision_encode_layers", "2", "--vision_decode_layers", "1",
        "--all_modal_visible", "1", "--unfreeze_keys", "vision,image_embeddings", "--ffn_vision_size", "64",
        "--ffn_share_size", "64", "--model_max_length", "128", "--use_data_packing", "0", "--ignore_instruction", "0",
        "--cfg_dropout", "0.2", "--skip_bad_records", "true", "--max_steps", "3",
    ])
    assert (m.vision_encode_layers, m.vision_decode_layers, m.all_modal_visible) == (2, 1, 1)
    assert (d.streaming_data, d.data_percentage, d.use_data_packing, d.skip_bad_records) == (1, 0.5, 0, True)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--t2i_ratio", "1.5"], "t2i_ratio=1.5"),
        (["--data_percentage", "0"], "data_percentage=0.0"),
        (["--all_modal_visible", "2"], "all_modal_visible=2"),
        (["--vision_encode_layers", "-1"], "vision_encode_layers=-1"),
        (["--model_max_length", "0"], "model_max_length=0"),
        (["--image_level_sizes", "64,x"], "image_level_sizes"),
        (["--label_smoothing_factor", "0.1"], "label_smoothing_factor=0.1"),
        (["--no_such_flag", "1"], "no_such_flag"),
    ],
)
def test_invalid_cli_values_name_the_field(extra, match):
    with pytest.raises((ValueError, SystemExit), match=match):
        parse_args([*BASE, *extra])


@pytest.mark.parametrize("flag", ["--model_version", "--vq_resolution"])
def test_dead_reference_knobs_are_refused_not_ignored(flag):
    """The decoder is always Qwen2 and the resolution is the image tokenizer's: these knobs would change nothing."""
    with pytest.raises((ValueError, SystemExit), match=flag.lstrip("-")):
        parse_args([*BASE, flag, "64"])


def test_invalid_choice_on_cli_exits():
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--use_data_packing", "3"])


@pytest.mark.parametrize(
    "text, match",
    [("bogus_key: 1\n", r"preset.yaml: unknown key\(s\) \['bogus_key'\]"),
     ("use_data_packing: 5\n", r"preset.yaml: use_data_packing=5 must be one of"),
     ("model_spec_module: y\n", r"preset.yaml: model_spec_module='y'"),
     ("- a\n- b\n", "mapping")],
)
def test_yaml_errors_name_file_and_key(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        parse_args(["--config", _yaml(tmp_path, text), *BASE])


def test_model_source_required():
    with pytest.raises(ValueError, match="model_name_or_path and model_config are both empty"):
        parse_args(["--output_dir", "out", "--use_cpu", "true"])


def test_shipped_presets_parse():
    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    presets = sorted(root.glob("*.yaml"))
    assert presets, "configs/train/*.yaml missing"
    for p in presets:
        m, d, t = parse_args(["--config", str(p), "--output_dir", "out", "--model_config", "x.json"])
        assert t.max_steps != 0, p


# ------------------------------------------------------------------------------ checkpoint vs arguments
VOCAB_ARGS = dict(image_offset=1024, level_sizes=(512,), vision_start_id=3, vision_end_id=4)


def _model_args(path, *extra):
    m, _, _ = parse_args(["--model_name_or_path", str(path), "--output_dir", "out", "--use_cpu", "true", *extra])
    return m


@pytest.fixture(scope="module")
def stock_qwen2(tmp_path_factory):
    """A tiny stock ``Qwen2ForCausalLM`` as save_pretrained writes it (what a downloaded Qwen2.5 looks like)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2")
    config = Qwen2Config(vocab_size=1100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def uni_x_checkpoint(tmp_path_factory):
    """A tiny Uni-X config.json (1 + 1 separated layers, all_modal_visible=0): the check reads nothing else."""
    from modeling import UniXConfig
    from modeling.vocab import CodeVocab

    path = tmp_path_factory.mktemp("uni_x")
    root = Path(__file__).resolve().parents[1]
    UniXConfig.from_json_file(str(root / "configs/model/tiny_uni_x.json")).with_vocab(CodeVocab(**VOCAB_ARGS)) \
        .save_pretrained(path)
    return path


@pytest.mark.parametrize("extra", [["--vision_encode_layers", "9"], []])
def test_plain_qwen2_checkpoint_fails_before_any_work_with_the_conversion_command(stock_qwen2, extra):
    from modeling.vocab import CodeVocab
    from uni_arch.train import builders

    m = _model_args(stock_qwen2, *extra)
    with pytest.raises(ValueError, match=r"'qwen2' checkpoint, not a Uni-X toolkit one") as err:
        builders.check_checkpoint(builders._checkpoint_config(m), m, CodeVocab(**VOCAB_ARGS))
    command = str(err.value).splitlines()[1].strip()
    assert command.startswith(f"python modeling/conversion.py --src {stock_qwen2} --dst {stock_qwen2}-uni_x "
                              "--variant uni_x")
    assert "--num_image_tokens 512 --image_offset 1024 --vision_start_token_id 3 --vision_end_token_id 4" in command
    assert ("--vision_encode_layers 9" in command) == bool(extra)


def test_plain_qwen2_checkpoint_fails_in_build_model_too(stock_qwen2):
    from modeling.vocab import CodeVocab
    from uni_arch.train import builders

    m, d, _ = parse_args(["--model_name_or_path", str(stock_qwen2), "--output_dir", "out", "--use_cpu", "true",
                          "--vision_encode_layers", "9"])
    with pytest.raises(ValueError, match="modeling/conversion.py"):
        builders.build_model(m, d, CodeVocab(**VOCAB_ARGS))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--vision_encode_layers", "2"], r"vision_encode_layers=2 disagrees with .* \(vision_encode_layers=1\)"),
        (["--vision_decode_layers", "0"], r"vision_decode_layers=0 disagrees with .* \(vision_decode_layers=1\)"),
        (["--all_modal_visible", "0"], r"all_modal_visible=0 disagrees with .* \(all_modal_visible=1\)"),
        (["--ffn_vision_size", "64"], r"ffn_vision_size=64 disagrees with .* \(ffn_vision_size=704\)"),
        (["--ffn_share_size", "64"], r"ffn_share_size=64 disagrees with .* \(ffn_share_size=704\)"),
        (["--moe_every_k", "2"], r"moe_every_k=2 disagrees with .* \(moe_every_k=1\)"),
        (["--decoder_sparse_step", "2"], r"moe_every_k=2 disagrees with .* \(moe_every_k=1\)"),
        (["--add_share_ffn", "1"], r"add_share_ffn=1 disagrees with .* \(add_share_ffn=0\)"),
        (["--model_spec_module", "mot"], r"variant 'mot' but .* is a 'uni_x' checkpoint"),
        (["--custom_cls", "none"], r"variant 'dense' but .* is a 'uni_x' checkpoint"),
    ],
)
def test_architecture_argument_disagreeing_with_the_checkpoint_names_field_and_values(uni_x_checkpoint, extra, match):
    from modeling.vocab import CodeVocab
    from uni_arch.train import builders

    m = _model_args(uni_x_checkpoint, *extra)
    with pytest.raises(ValueError, match=match):
        builders.check_checkpoint(builders._checkpoint_config(m), m, CodeVocab(**VOCAB_ARGS))


def test_agreeing_arguments_pass(uni_x_checkpoint):
    from modeling.vocab import CodeVocab
    from uni_arch.train import builders

    m = _model_args(uni_x_checkpoint, "--vision_encode_layers", "1", "--ffn_vision_size", "704", "--all_modal_visible", "1")
    builders.check_checkpoint(builders._checkpoint_config(m), m, CodeVocab(**VOCAB_ARGS))


# ------------------------------------------------------------------ the reference's knobs
def test_decoder_sparse_step_is_moe_every_k():
    """The reference's MoE step and ours are one rule (expert layer iff (i + 1) % k == 0): the reference's name sets
    ours; both given and different is an error naming both."""
    m, _, _ = parse_args([*BASE, "--model_spec_module", "moe", "--decoder_sparse_step", "2"])
    assert m.moe_every_k == 2
    with pytest.raises(ValueError, match="moe_every_k=3 and decoder_sparse_step=2"):
        parse_args([*BASE, "--model_spec_module", "moe", "--decoder_sparse_step", "2", "--moe_every_k", "3"])
    from modeling.configuration_uni_x import derive_layer_kinds

    # the reference's HardMoe DecoderLayer: (layer_idx + 1) % decoder_sparse_step == 0
    assert derive_layer_kinds("moe", 6, 0, 0, m.moe_every_k) == [
        "moe" if (i + 1) % 2 == 0 else "shared" for i in range(6)]


def test_share_ffn_and_mot_style_arguments_validate():
    m, _, _ = parse_args([*BASE, "--add_share_ffn", "1", "--ffn_vision_size", "0", "--ffn_share_size", "64"])
    assert (m.add_share_ffn, m.ffn_vision_size, m.ffn_share_size) == (1, 0, 64)
    with pytest.raises(ValueError, match="ffn_vision_size=0 must be positive"):  # 0 only means "none" with the share FFN
        parse_args([*BASE, "--ffn_vision_size", "0"])
    with pytest.raises(ValueError, match="add_share_ffn=2 must be 0 or 1"):
        parse_args([*BASE, "--add_share_ffn", "2"])
    m, _, t = parse_args([*BASE, "--model_spec_module", "mot", "--mot_style", "reference",
                          "--init_vision_with_text", "1"])
    assert m.mot_style == "reference" and t.init_vision_with_text == 1


def test_fresh_config_takes_the_reference_knobs(tmp_path):
    """A fresh model from a config json: add_share_ffn / mot_style reach the UniXConfig, and a knob of another
    variant is refused by UniXConfig naming it."""
    import json

    from modeling.vocab import CodeVocab
    from uni_arch.train import builders

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1536, vision_encode_layers=1,
                                   vision_decode_layers=1, image_offset=1024, image_level_sizes=[512],
                                   vision_start_token_id=3, vision_end_token_id=4)))
    vocab = CodeVocab(**VOCAB_ARGS)
    m, _, _ = parse_args(["--model_config", str(cfg), "--output_dir", "out", "--use_cpu", "true", "--add_share_ffn",
                          "1", "--ffn_share_size", "16"])
    config = builders._fresh_config(m, vocab)
    assert config.layer_kinds == ["separated", "share_ffn", "share_ffn", "separated"] and config.share_ffn_size == 16
    m, _, _ = parse_args(["--model_config", str(cfg), "--output_dir", "out", "--use_cpu", "true",
                          "--model_spec_module", "mot", "--mot_style", "reference"])
    assert builders._fresh_config(m, vocab).mot_style == "reference"
    m, _, _ = parse_args(["--model_config", str(cfg), "--output_dir", "out", "--use_cpu", "true",
                          "--model_spec_module", "moe", "--add_share_ffn", "1"])
    with pytest.raises(ValueError, match="add_share_ffn=1 is a Uni-X field"):
        builders._fresh_config(m, vocab)


def test_init_vision_with_text_copies_text_into_vision_branches():
    """The reference's init_vision_with_text=1 at training start: every vision tensor of the text's shape becomes the
    text tensor at the same depth; 0 changes nothing."""
    from modeling.conversion import vision_text_pairs
    from tests.model_fixtures import tiny_model
    from uni_arch.train import builders

    model = tiny_model("uni_x_amv0", ffn_vision_size=None)
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert builders.apply_init_vision_with_text(model, 0) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    pairs = list(vision_text_pairs(model))
    assert not any(torch.equal(p.text, p.vision) for p in pairs if p.text.dim() == 2)  # random before
    assert builders.apply_init_vision_with_text(model, 1) == len(pairs) > 0
    assert all(torch.equal(p.text, p.vision) for p in pairs)


def test_tokens_per_step_in_both_readings_of_the_batch_size():
    """Ours: rows x capacity; the reference: samples packed into ONE row, capped at model_max_length."""
    from uni_arch.train.builders import tokens_per_step

    # 4 rows of 2,048 x accumulation 2 x 8 ranks; the reference's 4 samples of 300 tokens: one row of 1,200
    assert tokens_per_step(4, 2, 8, 2048, 300.0) == {"ours": 4 * 2048 * 2 * 8, "reference": 1200 * 2 * 8}
    # the reference's train_batch_size=20 at 20,480 tokens with 3,000-token samples: the pack is full
    assert tokens_per_step(20, 1, 1, 20480, 3000.0) == {"ours": 20 * 20480, "reference": 20480}
    assert tokens_per_step(2, 1, 1, 100, None)["reference"] is None


def test_start_up_message_prints_tokens_per_step_in_both_readings():
    from loguru import logger

    from uni_arch.train import builders
    from uni_arch.train.dataset import PackedRowDataset

    rows = [{"input_ids": list(range(90)), "doc_lens": [30, 60]}, {"input_ids": list(range(60)), "doc_lens": [20, 20, 20]}]
    m, d, t = parse_args([*BASE, "--model_max_length", "100", "--per_device_train_batch_size", "3",
                          "--gradient_accumulation_steps", "2"])
    lines = []
    sink = logger.add(lambda msg: lines.append(str(msg)), level="WARNING")
    try:
        counts = builders.log_batch_size_readings(d, t, PackedRowDataset(rows))
    finally:
        logger.remove(sink)
    # mean sample = 150 tokens / 5 samples = 30; reference: min(3 x 30, 100) x 2 = 180; ours: 3 x 100 x 2 = 600
    assert counts == {"ours": 600, "reference": 180}
    text = "".join(lines)
    assert "per_device_train_batch_size=3 counts PACKED ROWS" in text and "600 tokens per optimizer step" in text
    assert "RAW SAMPLES" in text and "180 tokens per step" in text and "2.5 samples per row" in text
