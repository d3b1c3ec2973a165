"""Chameleon/Anole VQGAN: strict Lightning-checkpoint loading, taming layout, encode/decode, preprocessing.

The round trips use a reduced channel config (widths 32/64, 32 px); the real 512 px architecture is checked for its
key set, shapes and down-sampling on the meta device (no weights, no compute).
"""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from transformers.models.janus.modeling_janus import JanusVQVAEAttnBlock, JanusVQVAEConvUpsample, JanusVQVAEResnetBlock

from modeling.vq import load_image_tokenizer
from modeling.vq.chameleon import ChameleonVQGAN, chameleon_vq_config, config_from_yaml
from modeling.vq.preprocess import preprocess_image

SMALL = dict(base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16],
             latent_channels=32, embed_dim=8, num_embeddings=64, resolution=32)


def _yaml_doc(cfg: dict) -> dict:
    """A taming ``vqgan.yaml`` for the given (our-named) config."""
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg["embed_dim"], "n_embed": cfg["num_embeddings"],
        "ddconfig": {"double_z": False, "z_channels": cfg["latent_channels"], "resolution": cfg["resolution"],
                     "in_channels": 3, "out_ch": 3, "ch": cfg["base_channels"], "ch_mult": cfg["channel_multiplier"],
                     "num_res_blocks": cfg["num_res_blocks"], "attn_resolutions": cfg["attn_resolutions"],
                     "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}


@pytest.fixture(scope="module")
def small_model() -> ChameleonVQGAN:
    torch.manual_seed(0)
    model = ChameleonVQGAN(chameleon_vq_config(**SMALL))
    with torch.no_grad():  # spread the codebook so random encodings hit many codes
        model.quantize.embedding.weight.normal_()
    return model.eval()


def _save_lightning(tmp_path, state: dict, cfg: dict = SMALL):
    ckpt, conf = tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, ckpt)
    conf.write_text(yaml.safe_dump(_yaml_doc(cfg)))
    return ckpt, conf


def _with_loss_keys(state: dict) -> dict:
    return {**state, "loss.discriminator.main.0.weight": torch.zeros(2), "loss.perceptual_loss.lin0.model.1.weight":
            torch.zeros(1)}


def test_strict_load_round_trip_equals_in_memory(tmp_path, small_model):
    ckpt, conf = _save_lightning(tmp_path, _with_loss_keys(small_model.taming_state_dict()))
    loaded = ChameleonVQGAN.from_checkpoint(ckpt, conf)
    assert loaded.checkpoint_hash != "random-init" and loaded.tokenizer_id.startswith("chameleon-vqgan@")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc_a, enc_b = small_model.encode(x), loaded.encode(x)
    assert torch.equal(enc_a.codes_BN, enc_b.codes_BN)
    torch.testing.assert_close(loaded.decode(enc_b.codes_BN, enc_b.grid),
                               small_model.decode(enc_a.codes_BN, enc_a.grid), rtol=0, atol=0)
    # the registry path: a directory with vqgan.ckpt + vqgan.yaml
    via_registry = load_image_tokenizer("chameleon", str(tmp_path))
    assert torch.equal(via_registry.encode(x).codes_BN, enc_a.codes_BN)


def test_taming_key_names(small_model):
    keys = set(small_model.taming_state_dict())
    # taming stores decoder levels by level index: up.0 is full resolution (no upsample), up.2 the lowest
    assert "decoder.up.0.block.1.conv2.weight" in keys and "decoder.up.0.upsample.conv.weight" not in keys
    assert "decoder.up.2.upsample.conv.weight" in keys
    # attention at resolution 16 = level 1 of 32 px, both sides; mid-block attention always
    assert "encoder.down.1.attn.0.q.weight" in keys and "decoder.up.1.attn.1.proj_out.weight" in keys
    assert not any(k.startswith(("encoder.down.2.attn", "decoder.up.2.attn", "decoder.up.0.attn")) for k in keys)
    assert {"quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.bias",
            "encoder.mid.attn_1.k.weight", "decoder.mid.attn_1.v.weight"} <= keys


@pytest.mark.parametrize("problem", ["missing", "extra"])
def test_key_mismatch_raises_naming_the_key(tmp_path, small_model, problem):
    state = small_model.taming_state_dict()
    if problem == "missing":
        del state["decoder.up.1.attn.0.q.weight"]
        match = "missing keys: decoder.up.1.attn.0.q.weight"
    else:
        state["decoder.up.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)
        match = "unexpected keys: decoder.up.0.attn.0.q.weight"
    ckpt, conf = _save_lightning(tmp_path, state)
    with pytest.raises(ValueError, match=match):
        ChameleonVQGAN.from_checkpoint(ckpt, conf)


def test_shape_mismatch_and_missing_files(tmp_path, small_model):
    ckpt, conf = _save_lightning(tmp_path, small_model.taming_state_dict(), {**SMALL, "num_embeddings": 32})
    with pytest.raises(ValueError, match="quantize.embedding.weight: checkpoint \\(64, 8\\) vs model \\(32, 8\\)"):
        ChameleonVQGAN.from_checkpoint(ckpt, conf)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        ChameleonVQGAN.from_checkpoint(tmp_path / "nope.ckpt", conf)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        ChameleonVQGAN.from_checkpoint(ckpt, tmp_path / "nope.yaml")


class _OldLightningObject:  # stands in for a pickled class that weights_only=True refuses
    pass


def test_old_checkpoint_gets_a_clear_message(tmp_path, small_model):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": small_model.taming_state_dict(), "hparams": _OldLightningObject()}, ckpt)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        ChameleonVQGAN.from_checkpoint(ckpt, None)
    conf = tmp_path / "small.yaml"
    conf.write_text(yaml.safe_dump(_yaml_doc(SMALL)))
    trusted = ChameleonVQGAN.from_checkpoint(ckpt, conf, weights_only=False)  # the explicit opt-in fallback
    assert torch.equal(trusted.quantize.embedding.weight, small_model.quantize.embedding.weight)


def test_encode_decode_shapes_range_determinism(small_model):
    x = torch.rand(3, 3, 32, 48) * 2 - 1  # non-square: the conv net handles any multiple of 4 here
    enc = small_model.encode(x)
    assert enc.grid == (8, 12) and enc.codes_BN.shape == (3, 96) and enc.codes_BN.dtype == torch.long
    assert enc.levels_N.eq(0).all() and enc.levels_N.shape == (96,)
    assert 0 <= int(enc.codes_BN.min()) and int(enc.codes_BN.max()) < 64
    assert len(enc.codes_BN.unique()) > 4
    out1, out2 = small_model.decode(enc.codes_BN, enc.grid), small_model.decode(enc.codes_BN, enc.grid)
    assert out1.shape == x.shape and torch.equal(out1, out2) and out1.abs().max() <= 1
    assert torch.equal(small_model.encode(x).codes_BN, enc.codes_BN)
    with pytest.raises(ValueError, match="out of range"):
        small_model.decode(torch.full((1, 96), 64), (8, 12))


def test_preprocess_is_chameleons(small_model):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    pixels = small_model.preprocess([img, img])
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixels[0], preprocess_image(img, "fixed", target=32, downsample=4), rtol=0, atol=0)


def test_default_config_is_chameleons_on_meta_device():
    with torch.device("meta"):  # the 68.7M-parameter net without allocating or computing anything
        model = ChameleonVQGAN()
        z = model.quant_conv(model.encoder(torch.empty(1, 3, 512, 512)))
    assert model.downsample == 16 and tuple(z.shape) == (1, 256, 32, 32)  # 512 px -> 32x32 codes of dim 256
    state = model.taming_state_dict()
    assert 68e6 < sum(v.numel() for v in state.values()) < 70e6
    assert state["quantize.embedding.weight"].shape == (8192, 256)
    assert state["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert state["encoder.conv_out.weight"].shape == (256, 512, 3, 3)
    assert state["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert state["decoder.up.4.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert state["decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)  # 512 -> 256 channels
    assert state["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert state["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert not any(".attn." in k for k in state)  # Chameleon: attention only in the mid blocks
    assert model.level_sizes == (8192,)


def test_config_from_yaml_reads_ddconfig(tmp_path):
    conf = tmp_path / "vqgan.yaml"
    conf.write_text(yaml.safe_dump(_yaml_doc({**SMALL, "attn_resolutions": []})))
    cfg = config_from_yaml(conf)
    assert (cfg.base_channels, list(cfg.channel_multiplier), cfg.num_embeddings, cfg.attn_resolutions) == (
        32, [1, 2, 2], 64, [])
    conf.write_text(yaml.safe_dump({"model": {"params": {"embed_dim": 8}}}))
    with pytest.raises(ValueError, match="vqgan.yaml: model.params"):
        config_from_yaml(conf)


class _ReferenceTamingDecoder(nn.Module):
    """taming's ``Decoder`` layout written out independently: levels stored by index (``up.insert(0, ...)``),
    iterated from the lowest resolution, attention where ``curr_res in attn_resolutions``."""

    def __init__(self, cfg) -> None:
        super().__init__()
        ch, mult, n_res = cfg.base_channels, cfg.channel_multiplier, cfg.num_res_blocks
        block_in = ch * mult[-1]
        curr_res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = JanusVQVAEResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = JanusVQVAEAttnBlock(block_in)
        self.mid.block_2 = JanusVQVAEResnetBlock(cfg, block_in, block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(len(mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n_res + 1):
                up.block.append(JanusVQVAEResnetBlock(cfg, block_in, ch * mult[i_level]))
                block_in = ch * mult[i_level]
                if curr_res in cfg.attn_resolutions:
                    up.attn.append(JanusVQVAEAttnBlock(block_in))
            if i_level != 0:
                up.upsample = JanusVQVAEConvUpsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(len(self.up))):
            for i_block, block in enumerate(self.up[i_level].block):
                h = block(h)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


def test_decoder_equals_taming_layout(small_model):
    ref = _ReferenceTamingDecoder(small_model.config)
    dec_state = {k[len("decoder."):]: v for k, v in small_model.taming_state_dict().items() if k.startswith("decoder.")}
    ref.load_state_dict(dec_state, strict=True)  # taming's key names fit the reference exactly
    z = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small_model.decoder(z), ref(z), rtol=0, atol=0)
        # and the full decode path: codebook lookup -> post_quant_conv -> decoder, clamped to [-1, 1]
        codes = torch.randint(0, 64, (2, 16))
        q = small_model.quantize.embedding.weight[codes].view(2, 4, 4, 8).permute(0, 3, 1, 2)
        expected = ref(small_model.post_quant_conv(q)).clamp(-1, 1)
        # (float tolerance: a non-contiguous input takes another conv kernel)
        torch.testing.assert_close(small_model.decode(codes, (4, 4)), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- the published checkpoint layout
def taming_vqgan_shapes(ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                        resolution: int, z_channels: int, embed_dim: int, n_embed: int,
                        in_channels: int = 3, out_ch: int = 3) -> dict[str, tuple[int, ...]]:
    """Every key of a taming-transformers ``VQModel`` state dict with its shape, written out from the published
    architecture, not from our key map.

    Source: taming-transformers ``taming/modules/diffusionmodules/model.py`` (``Encoder``, ``Decoder``,
    ``ResnetBlock`` with ``temb_channels=0`` and a 1x1 ``nin_shortcut`` when the width changes, ``AttnBlock`` =
    norm/q/k/v/proj_out 1x1 convs, conv ``Downsample``/``Upsample``) and ``taming/models/vqgan.py`` (``VQModel``:
    ``quant_conv``, ``quantize.embedding``, ``post_quant_conv``; the ``loss.*`` modules are training-only), as
    vendored unchanged in facebookresearch/chameleon ``chameleon/inference/vqgan.py``. Encoder levels are
    ``down.{i}`` from full resolution; decoder levels ``up.{i}`` are stored by level index (``up.insert(0, ...)``),
    each with ``num_res_blocks + 1`` blocks; attention sits after each block of a level whose resolution is in
    ``attn_resolutions``, and always in the mid blocks.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels, top = len(ch_mult), ch * ch_mult[-1]
    conv("encoder.conv_in", ch, in_channels, 3)
    res, c_in = resolution, ch
    for i in range(levels):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", c_in, ch * ch_mult[i])
            c_in = ch * ch_mult[i]
            if res in attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", c_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
            res //= 2
    for side in ("encoder", "decoder"):
        resnet(f"{side}.mid.block_1", top, top)
        attn(f"{side}.mid.attn_1", top)
        resnet(f"{side}.mid.block_2", top, top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", z_channels, top, 3)
    conv("quant_conv", embed_dim, z_channels, 1)
    shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    conv("post_quant_conv", z_channels, embed_dim, 1)
    conv("decoder.conv_in", top, z_channels, 3)
    res, c_in = resolution // 2 ** (levels - 1), top
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c_in, ch * ch_mult[i])
            c_in = ch * ch_mult[i]
            if res in attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", c_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_in, c_in, 3)
            res *= 2
    norm("decoder.norm_out", c_in)
    conv("decoder.conv_out", out_ch, c_in, 3)
    return shapes


# Chameleon's / Anole's vqgan.yaml (ddconfig + n_embed/embed_dim). The yaml ships with the weights, not in the
# chameleon repository, so these values are as transformers' ChameleonVQVAEConfig (converted from it) gives them:
# 8192 codes of dim 256, ch 128, ch_mult [1, 1, 2, 2, 4], 2 res blocks, no attention outside the mid blocks, 512 px.
CHAMELEON_DDCONFIG = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[], resolution=512,
                          z_channels=256, embed_dim=256, n_embed=8192)


def test_real_vqgan_ckpt_key_set_and_shapes_are_exactly_ours():
    expected = taming_vqgan_shapes(**CHAMELEON_DDCONFIG)
    # Counted by hand (weight + bias each, the codebook alone): encoder = conv_in 2 + 10 blocks x 8 + 2 shortcuts
    # (128->256, 256->512) x 2 + 4 downsamples x 2 + mid (2 blocks x 8 + attention 10) + norm_out 2 + conv_out 2 = 124;
    # quant_conv 2 + codebook 1 + post_quant_conv 2 = 5; decoder = conv_in 2 + mid 26 + 15 blocks x 8 + 2 shortcuts
    # (512->256, 256->128) x 2 + 4 upsamples x 2 + norm_out 2 + conv_out 2 = 164.
    assert len(expected) == 124 + 5 + 164
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in ChameleonVQGAN().taming_state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []  # no missing/extra
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_loader_consumes_exactly_the_published_keys(tmp_path):
    """A checkpoint written from the published layout (here with attention at 16 px, so ``down.{i}.attn`` and
    ``up.{i}.attn`` are covered too) loads strictly, every tensor lands where taming put it, and one renamed key
    fails naming it."""
    cfg = {**SMALL, "attn_resolutions": [16], "num_res_blocks": 2}  # 2 blocks per level, as Chameleon
    shapes = taming_vqgan_shapes(ch=cfg["base_channels"], ch_mult=cfg["channel_multiplier"],
                                 num_res_blocks=cfg["num_res_blocks"], attn_resolutions=cfg["attn_resolutions"],
                                 resolution=cfg["resolution"], z_channels=cfg["latent_channels"],
                                 embed_dim=cfg["embed_dim"], n_embed=cfg["num_embeddings"])
    assert "encoder.down.1.attn.1.proj_out.weight" in shapes and "decoder.up.1.attn.2.q.bias" in shapes
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ckpt, conf = _save_lightning(tmp_path, _with_loss_keys(state), cfg)
    model = ChameleonVQGAN.from_checkpoint(ckpt, conf)
    loaded = model.taming_state_dict()
    assert set(loaded) == set(state)
    assert [k for k in state if not torch.equal(loaded[k], state[k])] == []
    # the decoder's up.0 (full resolution, taming's index) must hold the 32-channel blocks, up.2 the lowest level
    assert model.decoder.up[-1].block[0].conv1.weight.data_ptr() == loaded["decoder.up.0.block.0.conv1.weight"].data_ptr()
    renamed = dict(state)
    renamed["encoder.mid.attn_1.proj.weight"] = renamed.pop("encoder.mid.attn_1.proj_out.weight")
    ckpt, conf = _save_lightning(tmp_path, renamed, cfg)
    with pytest.raises(ValueError, match=r"missing keys: encoder.mid.attn_1.proj_out.weight; "
                                         r"unexpected keys: encoder.mid.attn_1.proj.weight"):
        ChameleonVQGAN.from_checkpoint(ckpt, conf)
