"""A two-level hierarchical VQ-VAE (VQ-VAE-2 layout) with DESIGN.md section 2's serialisation.

Architecture (defaults: 128 px -> bottom 16x16, top 8x8):

* ``enc_bottom``: pixels -> ``h_b`` at stride ``2 ** len(channel_multiplier)`` (8) through res blocks and stride-2
  convs; ``enc_top``: ``h_b`` -> ``h_t`` at twice that stride (16), one more down-sampling.
* Top codes quantise ``quant_conv_t(h_t)``. The top decoder ``dec_top`` lifts the quantised top map back to the
  bottom resolution, and the bottom codes quantise ``quant_conv_b([h_b, dec_top(q_t)])``: the bottom level encodes
  what the top one missed (VQ-VAE-2's conditioning of the bottom encoder on the decoded top).
* The decoder reads both levels: ``decoder([upsample_t(q_t), q_b])``.

Two backbones build the same wiring (``HQVAEConfig.backbone``); both quantise with transformers'
``ChameleonVQVAEVectorQuantizer`` (nearest-code lookup, straight-through gradient, commitment loss):

* ``"taming"`` (default, the published VQ-VAE-2 / HQ-VAE layout): transformers' taming-style blocks
  (``JanusVQVAEResnetBlock``, ``JanusVQVAEConvDownsample``, ``JanusVQVAEConvUpsample``) at every resolution, widths
  ``base_channels * channel_multiplier`` (multiples of 32: GroupNorm(32)). For photos.
* ``"conv"``: the shapes VQ's thin stacks (:mod:`modeling.vq.shapes_vq`: stride-2 convs without blocks at the high
  resolutions, pre-norm residual blocks with ``ChannelNorm`` at the code grids), widths ``channels``. Why: on the
  shapes world the taming stack trained at 1.54 s/step on 2 CPU cores (GroupNorm and 32-channel blocks at 64x64),
  ~1 h for a tokenizer, and GroupNorm's whole-image statistics make every background code depend on every object
  (see ``ChannelNorm``), which an autoregressive model cannot learn to draw. The encoder has no residual blocks
  (``enc_res_blocks``), so a code depends only on its neighbourhood.

Serialisation (:func:`serialize` / :func:`deserialize`): for each top position in raster order, the top code then
the four codes of its own 2x2 bottom block in raster order. An 8x8 top grid gives ``8 * 8 * 5 = 320`` codes with
levels ``[0, 1, 1, 1, 1] * 64``; ``grid`` is the top grid. Keeping a top code next to the bottom codes it governs
keeps the dependency short for the autoregressive model.

Checkpoints are a directory: ``config.json`` (:class:`HQVAEConfig`) + ``model.safetensors``, loaded strictly.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from loguru import logger
from torch import nn
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEVectorQuantizer
from transformers.models.janus.modeling_janus import (
    JanusVQVAEConvDownsample,
    JanusVQVAEConvUpsample,
    JanusVQVAEResnetBlock,
)

from modeling.vq.base import (
    EncodedImages,
    ImageTokenizer,
    config_from_dict,
    load_safetensors_dir,
    save_safetensors_dir,
)
from modeling.vq.preprocess import Preprocessor
from modeling.vq.shapes_vq import NORMS, Decoder, Encoder, ResBlock

BLOCK = 2  # each top code covers a BLOCK x BLOCK block of bottom codes


# -- serialisation (pure) ----------------------------------------------------------------------------------------
def serialize(top_BHW: torch.Tensor, bottom_B2H2W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleave the levels: per top position (raster), the top code then its 2x2 bottom block (raster).

    >>> top = torch.tensor([[[0, 1]]])                       # 1x2 top grid
    >>> bottom = torch.tensor([[[10, 11, 12, 13], [14, 15, 16, 17]]])   # 2x4 bottom grid
    >>> serialize(top, bottom)[0].tolist()
    [[0, 10, 11, 14, 15, 1, 12, 13, 16, 17]]
    """
    b, h, w = top_BHW.shape
    if bottom_B2H2W.shape != (b, BLOCK * h, BLOCK * w):
        raise ValueError(f"bottom grid must be {(b, BLOCK * h, BLOCK * w)} for top {(b, h, w)}, "
                         f"got {tuple(bottom_B2H2W.shape)}")
    # (B, 2h, 2w) -> (B, h, 2, w, 2) -> (B, h, w, 2, 2) -> (B, h*w, 4): each top cell's block, raster inside.
    blocks_BN4 = bottom_B2H2W.reshape(b, h, BLOCK, w, BLOCK).permute(0, 1, 3, 2, 4).reshape(b, h * w, BLOCK * BLOCK)
    codes_BN5 = torch.cat([top_BHW.reshape(b, h * w, 1), blocks_BN4], dim=2)
    return codes_BN5.reshape(b, -1), serialized_levels(h * w)


def serialized_levels(num_top: int) -> torch.Tensor:
    """``[0, 1, 1, 1, 1] * num_top``: the codebook level of each serialised position."""
    return torch.tensor([0] + [1] * (BLOCK * BLOCK), dtype=torch.long).repeat(num_top)


def deserialize(codes_BN: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`serialize`: ``codes_BN`` + top ``grid`` -> ``(top_BHW, bottom_B2H2W)``."""
    h, w = grid
    per_top = 1 + BLOCK * BLOCK
    if codes_BN.dim() != 2 or codes_BN.shape[1] != h * w * per_top:
        raise ValueError(f"codes_BN must be (B, {h * w * per_top}) for top grid {tuple(grid)}, "
                         f"got {tuple(codes_BN.shape)}")
    b = codes_BN.shape[0]
    codes_BN5 = codes_BN.reshape(b, h * w, per_top)
    top_BHW = codes_BN5[:, :, 0].reshape(b, h, w)
    # (B, h*w, 4) -> (B, h, w, 2, 2) -> (B, h, 2, w, 2) -> (B, 2h, 2w)
    bottom = codes_BN5[:, :, 1:].reshape(b, h, w, BLOCK, BLOCK).permute(0, 1, 3, 2, 4)
    return top_BHW, bottom.reshape(b, BLOCK * h, BLOCK * w)


# -- model ---------------------------------------------------------------------------------------------------------
@dataclass
class HQVAEConfig:
    """Architecture of :class:`HQVAE`; saved as ``config.json``.

    ``channel_multiplier[i]`` widens level ``i`` of the bottom encoder (each level ends with a stride-2 conv), so the
    bottom stride is ``2 ** len(channel_multiplier)`` and the top stride twice that.
    """

    resolution: int = 128
    in_channels: int = 3
    backbone: str = "taming"  # "taming" | "conv" (module docstring)
    # taming backbone
    base_channels: int = 64
    channel_multiplier: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    # conv backbone: channels[i] is the width at resolution / 2**i down to the bottom grid (as ShapesVQConfig)
    channels: tuple[int, ...] = (16, 48, 96)
    enc_res_blocks: int = 0  # at the top grid, encoder side
    dec_res_blocks: int = 1  # at the bottom grid, decoder side
    norm: str = "channel"
    embed_dim: int = 64
    level_sizes: tuple[int, int] = (512, 512)  # (K_top, K_bottom)
    commitment_beta: float = 0.25
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channel_multiplier = tuple(int(m) for m in self.channel_multiplier)
        self.channels = tuple(int(c) for c in self.channels)
        self.level_sizes = tuple(int(k) for k in self.level_sizes)
        if len(self.level_sizes) != 2 or min(self.level_sizes) < 2:
            raise ValueError(f"level_sizes must be (K_top, K_bottom), each >= 2, got {self.level_sizes=}")
        if self.backbone not in ("taming", "conv"):
            raise ValueError(f"HQVAEConfig.backbone must be 'taming' or 'conv', got {self.backbone!r}")
        if self.backbone == "conv":
            if len(self.channels) < 2 or min(self.channels) < 1 or min(self.enc_res_blocks, self.dec_res_blocks) < 0:
                raise ValueError(f"conv backbone: channels must list >= 2 positive widths and the res-block counts "
                                 f"be >= 0, got {self.channels=}, {self.enc_res_blocks=}, {self.dec_res_blocks=}")
            if self.norm not in NORMS:
                raise ValueError(f"HQVAEConfig.norm must be one of {sorted(NORMS)}, got {self.norm=}")
        elif not self.channel_multiplier or any((self.base_channels * m) % 32 for m in self.channel_multiplier):
            raise ValueError(f"every width base_channels * m must be a multiple of 32 (GroupNorm(32)), got "
                             f"{self.base_channels=}, {self.channel_multiplier=}")
        if self.resolution % self.top_downsample:
            raise ValueError(f"resolution must be a multiple of the top stride: {self.resolution=}, "
                             f"{self.top_downsample=}")

    @property
    def bottom_downsample(self) -> int:
        return 2 ** (len(self.channels) - 1 if self.backbone == "conv" else len(self.channel_multiplier))

    @property
    def top_downsample(self) -> int:
        return BLOCK * self.bottom_downsample

    @property
    def top_grid(self) -> tuple[int, int]:
        side = self.resolution // self.top_downsample
        return side, side

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(channel_multiplier=list(self.channel_multiplier), channels=list(self.channels),
                 level_sizes=list(self.level_sizes))
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "HQVAEConfig":
        if "backbone" not in d:  # saved before the conv backbone existed: a taming model
            d = {**d, "backbone": "taming"}
        return config_from_dict(cls, d, source)


def _res_stack(cfg: HQVAEConfig, c_in: int, c_out: int, n: int) -> list[nn.Module]:
    blocks = []
    for _ in range(n):
        blocks.append(JanusVQVAEResnetBlock(cfg, in_channels=c_in, out_channels=c_out))
        c_in = c_out
    return blocks


def _head(channels: int, out: int) -> nn.Sequential:
    """GroupNorm -> swish -> 3x3 conv: taming's output head."""
    return nn.Sequential(nn.GroupNorm(32, channels, eps=1e-6), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))


def _taming_modules(cfg: HQVAEConfig) -> dict[str, nn.Module]:
    """The taming backbone: res blocks at every resolution, GroupNorm(32)."""
    widths = [cfg.base_channels * m for m in cfg.channel_multiplier]
    c_b, d = widths[-1], cfg.embed_dim
    enc: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)]
    c = cfg.base_channels
    for width in widths:  # res blocks then a stride-2 conv per level
        enc += _res_stack(cfg, c, width, cfg.num_res_blocks) + [JanusVQVAEConvDownsample(width)]
        c = width
    dec: list[nn.Module] = [nn.Conv2d(2 * d, c_b, 3, padding=1), *_res_stack(cfg, c_b, c_b, cfg.num_res_blocks)]
    c = c_b
    for width in reversed(widths):  # mirror of the encoder: res blocks then upsample
        dec += _res_stack(cfg, c, width, cfg.num_res_blocks) + [JanusVQVAEConvUpsample(width)]
        c = width
    return {
        "enc_bottom": nn.Sequential(*enc, *_res_stack(cfg, c_b, c_b, cfg.num_res_blocks)),
        "enc_top": nn.Sequential(JanusVQVAEConvDownsample(c_b), *_res_stack(cfg, c_b, c_b, cfg.num_res_blocks)),
        "quant_conv_t": nn.Sequential(nn.GroupNorm(32, c_b, eps=1e-6), nn.SiLU(), nn.Conv2d(c_b, d, 1)),
        "dec_top": nn.Sequential(nn.Conv2d(d, c_b, 3, padding=1), *_res_stack(cfg, c_b, c_b, cfg.num_res_blocks),
                                 JanusVQVAEConvUpsample(c_b)),
        "quant_conv_b": nn.Conv2d(2 * c_b, d, 1),
        "decoder": nn.Sequential(*dec, _head(c, cfg.in_channels)),
    }


def _conv_modules(cfg: HQVAEConfig) -> dict[str, nn.Module]:
    """The conv backbone: the shapes VQ's stacks (``Encoder`` without its output conv, ``Decoder``) around the
    same two-level wiring; the decoder reads both levels (``2 * embed_dim`` channels) at the bottom grid.

    The top level's down- and up-sampling are non-overlapping (2x2, stride 2; 1x1 before the transposed conv), so a
    top code sees only its own cell's bottom features and a bottom code only its own top code: with the 4x4 / 3x3
    kernels of the taming wiring a bottom code's receptive field spanned ~40 px of a 64 px image and an empty
    background cell next to an object changed codes (background consistency 65% against the gate's 90%).
    """
    ch, d = cfg.channels, cfg.embed_dim
    stacks = SimpleNamespace(channels=ch, code_dim=2 * d, enc_res_blocks=0, dec_res_blocks=cfg.dec_res_blocks,
                             mid_res_blocks=0, norm=cfg.norm)
    encoder, c_b = Encoder(stacks), ch[-1]
    return {
        "enc_bottom": nn.Sequential(encoder.conv_in, nn.SiLU(),
                                    *(m for conv in encoder.down for m in (conv, nn.SiLU()))),
        "enc_top": nn.Sequential(nn.Conv2d(c_b, c_b, 2, stride=2), nn.SiLU(),
                                 *(ResBlock(c_b, cfg.norm) for _ in range(cfg.enc_res_blocks))),
        "quant_conv_t": nn.Conv2d(c_b, d, 1),
        "dec_top": nn.Sequential(nn.Conv2d(d, c_b, 1), nn.SiLU(), nn.ConvTranspose2d(c_b, c_b, 2, stride=2),
                                 nn.SiLU()),
        "quant_conv_b": nn.Conv2d(2 * c_b, d, 1),
        "decoder": Decoder(stacks),
    }


class HQVAE(ImageTokenizer):
    """Two-level VQ-VAE: top codes at stride 16, bottom codes at stride 8 (defaults), VQ-VAE-2 wiring."""

    name = "hqvae"

    def __init__(self, config: HQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else HQVAEConfig()
        modules = _conv_modules(cfg) if cfg.backbone == "conv" else _taming_modules(cfg)
        for name in ("enc_bottom", "enc_top", "quant_conv_t", "dec_top", "quant_conv_b", "decoder"):
            self.add_module(name, modules[name])
        d = cfg.embed_dim
        self.quantize_t = ChameleonVQVAEVectorQuantizer(
            SimpleNamespace(num_embeddings=cfg.level_sizes[0], embed_dim=d, beta=cfg.commitment_beta))
        self.quantize_b = ChameleonVQVAEVectorQuantizer(
            SimpleNamespace(num_embeddings=cfg.level_sizes[1], embed_dim=d, beta=cfg.commitment_beta))
        self.upsample_t = nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)  # top map -> bottom resolution
        self.level_sizes = cfg.level_sizes
        self.preprocessor = Preprocessor("fixed", cfg.resolution, cfg.top_downsample)

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv (where taming's adaptive GAN weight compares gradient norms)."""
        return self.decoder.conv_out.weight if isinstance(self.decoder, Decoder) else self.decoder[-1][-1].weight

    @property
    def native_grid(self) -> tuple[int, int]:
        return self.config.top_grid

    def code_levels(self, grid: tuple[int, int]) -> torch.Tensor:
        """Interleaved: per top position, its top code (level 0) then its 2x2 bottom block (level 1)."""
        return serialized_levels(int(grid[0]) * int(grid[1]))

    # -- training / analysis forward ------------------------------------------------------------------------------
    def quantize_levels(self, pixels_BCHW: torch.Tensor):
        """-> (q_t, q_b, vq_loss, top_BHW, bottom_B2H2W); straight-through quantised maps for training."""
        h_b = self.enc_bottom(pixels_BCHW)
        q_t, loss_t, idx_t = self.quantize_t(self.quant_conv_t(self.enc_top(h_b)))
        q_b, loss_b, idx_b = self.quantize_b(self.quant_conv_b(torch.cat([h_b, self.dec_top(q_t)], dim=1)))
        b = pixels_BCHW.shape[0]
        return q_t, q_b, loss_t + loss_b, idx_t.view(b, *q_t.shape[-2:]), idx_b.view(b, *q_b.shape[-2:])

    def decode_latents(self, q_t: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([self.upsample_t(q_t), q_b], dim=1))

    def forward(self, pixels_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction in ~[-1, 1], vq + commitment loss); the training objective adds a pixel loss."""
        q_t, q_b, vq_loss, _, _ = self.quantize_levels(pixels_BCHW)
        return self.decode_latents(q_t, q_b), vq_loss

    # -- ImageTokenizer ------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Shorter side to ``resolution``, centre crop, [-1, 1]; ``grid`` is the top grid (another size)."""
        return self.preprocessor.batch(list(images), grid)

    @torch.no_grad()
    def encode(self, pixels_BCHW: torch.Tensor) -> EncodedImages:
        h, w = pixels_BCHW.shape[-2:]
        s = self.config.top_downsample
        if h % s or w % s:
            raise ValueError(f"image size must be a multiple of {s}, got {h}x{w}")
        _, _, _, top_BHW, bottom_B2H2W = self.quantize_levels(pixels_BCHW.to(self.quant_conv_b.weight))
        codes_BN, levels_N = serialize(top_BHW, bottom_B2H2W)
        return EncodedImages(codes_BN, levels_N, (h // s, w // s))

    @torch.no_grad()
    def decode(self, codes_BN: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        top_BHW, bottom_B2H2W = deserialize(codes_BN.to(self.quant_conv_b.weight.device), grid)
        for level, (codes, k) in enumerate(zip((top_BHW, bottom_B2H2W), self.level_sizes)):
            if codes.numel() and (codes.min() < 0 or codes.max() >= k):
                raise ValueError(f"level {level} codes out of range [0, {k}): min {int(codes.min())}, "
                                 f"max {int(codes.max())}")
        q_t = self.quantize_t.embedding(top_BHW).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
        q_b = self.quantize_b.embedding(bottom_B2H2W).permute(0, 3, 1, 2)
        return self.decode_latents(q_t, q_b).clamp(-1.0, 1.0)  # the interface promises [-1, 1]

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (temp file, then rename)."""
        return save_safetensors_dir(self, out_dir, self.config.to_dict())

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "HQVAE":
        """Load a :meth:`save_pretrained` directory strictly; errors name the path and the offending keys."""
        model = load_safetensors_dir(cls, HQVAEConfig, path)
        logger.info(f"loaded {model.tokenizer_id} from {path}")
        return model
