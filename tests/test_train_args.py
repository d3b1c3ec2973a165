"""Argument groups: stated precedence (defaults < YAML < CLI), reference knob names, errors that name the field."""

from pathlib import Path

import pytest

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
