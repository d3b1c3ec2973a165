"""Tiny model configs and documents shared by the tests/test_model_*.py files (built in code, no files), and a tiny
saved checkpoint for the inference tests (tests/test_uni_infer.py, test_scheduler.py, test_api_server.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from modeling import UniXConfig, build_model

TEXT_VOCAB = 96  # ids [0, 96) are text; 10/11 are <|vision_start|>/<|vision_end|>
VISION_START, VISION_END = 10, 11
NUM_CODES = 64
VARIANTS = {
    "dense": dict(variant="dense"),
    "uni_x_amv0": dict(variant="uni_x", vision_encode_layers=1, vision_decode_layers=1, all_modal_visible=0),
    "uni_x_amv1": dict(variant="uni_x", vision_encode_layers=1, vision_decode_layers=1, all_modal_visible=1),
    "mot": dict(variant="mot"),
    "moe": dict(variant="moe", moe_every_k=2),
}


BACKBONES = ("qwen2", "qwen3")  # the `backbone` fixture (tests/conftest.py) runs the model tests over both
STOCK_CAUSAL_LM = {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}


def tiny_config(**overrides) -> UniXConfig:
    """Hidden 32, 4 layers, GQA 4/2 heads, 96 text ids + 64 image codes; a vision FFN narrower than the text one.

    On ``backbone="qwen3"`` the heads are 16 wide (not hidden / heads = 8), as Qwen3's own head width is free of the
    hidden size: a path that derived it from ``hidden_size`` would fail every qwen3 test.
    """
    fields = dict(
        vocab_size=TEXT_VOCAB + NUM_CODES, hidden_size=32, intermediate_size=64, ffn_vision_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        image_offset=TEXT_VOCAB, image_level_sizes=[NUM_CODES], vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )
    fields.update(overrides)
    if fields.get("backbone") == "qwen3":
        fields.setdefault("head_dim", 16)
    return UniXConfig(**fields)


def stock_config(config: UniXConfig, intermediate_size: int | None = None) -> Qwen2Config | Qwen3Config:
    """A stock config of ``config.backbone`` (Qwen2 or Qwen3) with the architecture of ``config`` (eager
    attention), for stock reference modules."""
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=intermediate_size or config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
    )
    if config.backbone == "qwen3":
        cfg = Qwen3Config(**fields, head_dim=config.head_dim, attention_bias=config.attention_bias)
    else:
        cfg = Qwen2Config(**fields)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(name: str, attn: str = "eager", **overrides):
    torch.manual_seed(0)
    model = build_model(tiny_config(**{**VARIANTS[name], **overrides}), attn_implementation=attn)
    return model.eval()


def text_ids(n: int, gen: torch.Generator) -> list[int]:
    return (torch.randint(12, TEXT_VOCAB, (n,), generator=gen)).tolist()


def image_ids(n: int, gen: torch.Generator) -> list[int]:
    return (torch.randint(TEXT_VOCAB, TEXT_VOCAB + NUM_CODES, (n,), generator=gen)).tolist()


def documents(seed: int = 0) -> list[list[int]]:
    """Text only, image only, text first, image first (with a trailing caption), and a 1-token document."""
    g = torch.Generator().manual_seed(seed)
    return [
        text_ids(7, g),
        image_ids(9, g),
        text_ids(5, g) + [VISION_START] + image_ids(8, g) + [VISION_END] + text_ids(3, g),
        [VISION_START] + image_ids(6, g) + [VISION_END] + text_ids(6, g),
        text_ids(1, g),
    ]


def pack(docs: list[list[int]]) -> dict[str, torch.Tensor]:
    """The packed-row batch the training collator sends: ids, restarting positions, cu_seq_lens; no mask."""
    lengths = [len(d) for d in docs]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return {
        "input_ids": torch.tensor([sum(docs, [])]),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def make_checkpoint(root: Path, kind: str) -> Path:
    """A random tiny Uni-X (all_modal_visible=0) saved as training saves it, with a random image tokenizer."""
    from modeling.vocab import CodeVocab
    from modeling.vq.hqvae import HQVAE, HQVAEConfig
    from modeling.vq.shapes_vq import ShapesVQ, ShapesVQConfig
    from uni_arch.train.inference_spec import ImageTokenizerRef, InferenceSpec
    from uni_arch.train.synthetic import write_tokenizer
    from uni_arch.train.templates import SampleBuilder

    torch.manual_seed(0)
    if kind == "shapes":  # 16x16 px -> 4x4 codes of one 64-code level
        vq = ShapesVQ(ShapesVQConfig(image_size=16, channels=(8, 16, 32), codebook_size=64, code_dim=8))
    else:  # HQ-VAE: 8x8 px -> a 2x2 top grid, 20 interleaved codes [0, 1, 1, 1, 1] x 4 of two 16-code levels
        vq = HQVAE(HQVAEConfig(resolution=8, base_channels=32, channel_multiplier=(1,), embed_dim=8,
                               level_sizes=(16, 16)))
    vq.save_pretrained(root / "vq")
    tokenizer = write_tokenizer(root / "tokenizer")
    vocab = CodeVocab.from_tokenizer(tokenizer, vq.level_sizes)
    config = UniXConfig(
        variant="uni_x", vision_encode_layers=1, vision_decode_layers=1, all_modal_visible=0, hidden_size=32,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=16,
        image_offset=8, image_level_sizes=[8], vision_start_token_id=3, vision_end_token_id=4,
        max_position_embeddings=512, tie_word_embeddings=False).with_vocab(vocab)
    model = build_model(config)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    ref = ImageTokenizerRef(kind, str(root / "vq"), vq.checkpoint_hash)
    InferenceSpec.from_builder(SampleBuilder(tokenizer, vocab), ref, vq.native_grid).save(ckpt)
    return ckpt


class Biased(torch.nn.Module):
    """The model with ``bias`` added to the logits of ``ids``: makes a random model want specific tokens."""

    def __init__(self, model, ids, bias: float):
        super().__init__()
        self.inner, self.config, self.ids, self.bias = model, model.config, list(ids), bias

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits[..., self.ids] += self.bias
        return out
