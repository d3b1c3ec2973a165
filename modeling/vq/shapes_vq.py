"""A small conv VQ-VAE for the 64x64 shapes world, trainable from scratch on 2 CPU cores in minutes.

Design (and why):

* **Thin at full resolution, wide at the code grid.** A 3x3 conv at 64x64 costs ``C_in * C_out * 9 * 4096`` MACs per
  image, so the 64x64 layers get few channels (``channels[0]``) and the capacity sits at the code grid
  (``channels[-1]``) where a channel costs 64x less. Down-sampling is a strided 4x4 conv and up-sampling a 4x4 transposed conv (2.25x
  cheaper than nearest-upsample + 3x3 conv at the same widths). Normalisation lives only in the residual blocks at
  the code grid (pre-norm, last conv zero-initialised): a norm at 64x64 would cost as much as the convs, and
  without any norm the full-size model diverged once the learning rate reached 2e-3.
* **Local codes.** The norm is per position (:class:`ChannelNorm`), never across the grid, so a code depends only
  on the pixels in its receptive field: an empty background is the same few codes in every image, which is what an
  autoregressive model can learn to draw (``background_consistency_pct`` in ``data_process/train_vq.py``).
* **Factorised, l2-normalised codes** (ViT-VQGAN, Yu et al. 2022; "Improved VQGAN"). The encoder projects to a
  low-dimensional ``code_dim`` (16) and both the encoder output and the codebook are unit vectors, so the lookup is a
  cosine-similarity argmax. Low-dimensional unit codes make every code reachable from the encoder and are the first
  remedy against codebook collapse.
* **EMA codebook with dead-code restart.** The codebook is not a parameter: it follows the (renormalised) EMA of the
  encoder vectors assigned to it (van den Oord et al. 2017, appendix). A code whose EMA assignment count falls below
  ``restart_ratio`` of the average count is restarted on an encoder vector of the current batch, drawn with
  probability proportional to its quantisation error, so all ``K`` codes stay in use and new codes go where the
  codebook is worst (second remedy). Restarts happen only in training mode and are deterministic given the torch RNG.
* **Straight-through estimator** for the encoder gradient, plus a commitment loss ``beta * |z - sg(q)|^2`` computed
  on the unit vectors.
* **Edge-weighted reconstruction loss** (``edge_loss_weight``, :func:`edge_weights`): pixels within one pixel of a
  colour step count up to ``1 + edge_loss_weight`` (9x by default). Plain MSE is dominated by the flat background,
  while what the shapes detector (and a GenEval score) needs is on the outlines: a diamond's tips, a small object's
  corners, the gap between two same-colour neighbours. Free per step.

Default: 64x64 images on an **8x8** grid of 512 codes of dim 16, four decoder residual blocks at the grid, no encoder
residual block (``data_process/train_vq.py`` has the schedule and the tokenizer figures). Why 8x8 and 512: the grid
and the codebook are what the LLM must model, and the tiny Uni-X of ``bash train.sh`` (800 steps, same data) only
learns to follow its prompt on short sequences of few codes. Text-to-image over the 40 single-object prompts, 8
seeds at CFG 4, with the caption probe (``tools/conditioning_probe.py``: nats per code a wrong caption costs):

    tokenizer (grid, codes, detector on reconstructions)   caption gap   right colour   exact
    16x16, 512, 98.8%  (the previous default)               0.0065        22%            4.1%
    8x8,   512, 45.7%  (2 decoder blocks, 800 steps)        0.100         95%            37.5%  (red circle 7 of 8)
    8x8, 1,024, 83.6%  (LLM 600 steps)                      0.017         29%            7.5%
    8x8, 2,048, 95.4%                                       0.020         20%            1.6%

On 16x16 a text-to-image sample is ~285 tokens of which the caption informs a handful (an object's first codes fix
its colour and shape; the rest copy them); on 8x8 it is ~90, and a run sees 3-4x more samples in the same compute.
A larger codebook reconstructs better but spreads each colour over more codes, and the same run no longer learns
the caption. So the tokenizer's capacity goes into the decoder (cheap at 8x8), not the codebook. The 16x16
tokenizer remains a few flags away (``--channels 24,64,128 --dec_res_blocks 2 --max_steps 800``), with these figures:

16x16 (512 codes of dim 16, no encoder residual block, 800 steps):
36.9 dB held-out PSNR and the detector reads 99.3% of the reconstructions of 1,000 held-out scenes exactly, with
empty background encoded by its position's one code (background consistency 100%, code perplexity 21.5). The
earlier GroupNorm encoder with a residual block reached 37.8 dB / 99.3% but perplexity 242 and consistency 15.7%:
better reconstructions, undrawable codes. With plain MSE the schedule gave 35.4 dB and 95-96%, below the 97% gate.

Checkpoints are a directory with ``config.json`` (:class:`ShapesVQConfig`) and ``model.safetensors``; loading is
strict and fails with the path and the offending keys before any work. ``checkpoint_hash`` is the safetensors file's
hash, so records name the exact weights (``shapes-vq@<hash>``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modeling.vq.base import (
    EncodedImages,
    ImageTokenizer,
    config_from_dict,
    load_safetensors_dir,
    save_safetensors_dir,
)



class ConvGridGeometry:
    """The code grid of a convolutional tokenizer config with ``image_size`` and ``channels`` (one stride-2 stage
    between consecutive widths); shared by :class:`ShapesVQConfig` and the RQ-VAE's config."""

    image_size: int
    channels: tuple[int, ...]

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return (side, side)


@dataclass
class ShapesVQConfig(ConvGridGeometry):
    """Architecture of :class:`ShapesVQ`; saved as ``config.json`` next to the weights.

    ``channels[i]`` is the width at resolution ``image_size / 2**i``; ``len(channels) - 1`` stride-2 stages give the
    down-sampling factor (4 entries -> 64x64 images on an 8x8 code grid; 3 -> 16x16).
    """

    image_size: int = 64
    channels: tuple[int, ...] = (16, 48, 128, 128)
    # Residual blocks at the code grid, encoder side. 0 keeps each code's receptive field to a few px around its
    # patch: with one block (radius ~16 px) an object 2 cells away still moved the background codes (consistency
    # 83%, code perplexity 109); with none, 100% and 21.5 at 36.9 dB / 99.3% (see data_process/train_vq.py).
    enc_res_blocks: int = 0
    # Decoder side, at the code grid (cheap there): an 8x8 code covers 8x8 px, and the outlines the detector reads
    # are rebuilt from the neighbouring codes (the codebook stays at 512 for the LLM's sake, see the module doc).
    # 2, not 4 (2026-12-02): the same gate figures (93.9-95.8% detector, 35.1-37.1 dB, background 100%) at 0.21
    # instead of 0.27 s/step in fp32, and the default train.sh checkpoint drew far better on it (64 seeds: red
    # circle 67-72% against 47-59%, 40-pair exact 71-73% against 48-59%; README). It needs train_vq's 300-step warmup:
    # with 100 one fp32 run blew up early and failed the gate (train_vq's module doc).
    dec_res_blocks: int = 2
    mid_res_blocks: int = 0  # decoder residual blocks at the intermediate resolutions (costly at 32x32)
    codebook_size: int = 512
    code_dim: int = 16
    commitment_beta: float = 0.25
    ema_decay: float = 0.95
    restart_ratio: float = 0.1  # a code is dead when its EMA count < restart_ratio * (vectors per batch / K)
    # Training only: extra weight of the reconstruction error near edges (see edge_weights); 0 = plain MSE.
    edge_loss_weight: float = 8.0
    # "channel": LayerNorm over the channels at each position (ChannelNorm; a code depends only on its receptive
    # field). "group": GroupNorm, whose statistics span the whole grid, so far-away content moves every code:
    # the checkpoints saved before this field existed, which are read as "group" (see from_dict).
    norm: str = "channel"

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.edge_loss_weight = float(self.edge_loss_weight)
        if len(self.channels) < 2 or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must list >= 2 positive widths, got {self.channels=}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size must be divisible by the down-sampling factor: {self.image_size=}, "
                             f"{self.downsample=} (from {len(self.channels)=})")
        if self.codebook_size < 2 or self.code_dim < 2:
            raise ValueError(f"need codebook_size >= 2 and code_dim >= 2, got {self.codebook_size=}, {self.code_dim=}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay=}")
        if self.edge_loss_weight < 0:
            raise ValueError(f"edge_loss_weight must be >= 0, got {self.edge_loss_weight=}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {self.norm=}")
        if min(self.enc_res_blocks, self.dec_res_blocks, self.mid_res_blocks) < 0:
            raise ValueError("enc_res_blocks, dec_res_blocks and mid_res_blocks must be >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "ShapesVQConfig":
        if "norm" not in d:  # saved before the field existed: those models were trained with GroupNorm
            d = {**d, "norm": "group"}
        return config_from_dict(cls, d, source)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of a ``(B, C, H, W)`` map: no statistic crosses positions.

    Why not GroupNorm: its mean and variance span the whole grid, so an object anywhere shifts the features, and so
    the codes, of every background position. The GroupNorm tokenizer encoded the always-empty corner of the 16x16
    grid with 112 different codes over 4,000 images (entropy 2.2 nats) and an interior background position with
    ~250-500: an autoregressive model cannot learn to draw an empty background whose codes depend on everything
    else, and its samples were scattered fragments. Same parameters (``weight``, ``bias`` of size C) as GroupNorm.
    """

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return super().forward(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


NORMS = {"channel": ChannelNorm, "group": lambda channels: nn.GroupNorm(min(8, channels), channels)}


class ResBlock(nn.Module):
    """Pre-norm ``x + conv(silu(norm(conv(silu(norm(x))))))`` whose second conv starts at zero (an identity at init).

    Without the norms and the zero init, the full-size model diverged (MSE 0.05 -> 3e3) when the warmup reached
    lr 2e-3; the norms only run at the code grid, where they are cheap next to the 3x3 convs.
    """

    def __init__(self, channels: int, norm: str = "channel") -> None:
        super().__init__()
        self.norm1 = NORMS[norm](channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = NORMS[norm](channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return x_BCHW + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x_BCHW))))))


class Encoder(nn.Module):
    def __init__(self, cfg: ShapesVQConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1) for i in range(len(ch) - 1))
        self.res = nn.Sequential(*(ResBlock(ch[-1], cfg.norm) for _ in range(cfg.enc_res_blocks)))
        self.conv_out = nn.Conv2d(ch[-1], cfg.code_dim, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x_BCHW))
        for conv in self.down:
            h = F.silu(conv(h))
        return self.conv_out(F.silu(self.res(h)))  # B, code_dim, h, w


class Decoder(nn.Module):
    def __init__(self, cfg: ShapesVQConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.code_dim, ch[-1], 3, padding=1)
        self.res = nn.Sequential(*(ResBlock(ch[-1], cfg.norm) for _ in range(cfg.dec_res_blocks)))
        # up[i] maps resolution level i+1 -> i (channels[i+1] -> channels[i]), applied from the coarsest level.
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(ch[i + 1], ch[i], 4, stride=2, padding=1) for i in range(len(ch) - 1)
        )
        self.mid = nn.ModuleList(
            nn.Sequential(*(ResBlock(ch[i], cfg.norm) for _ in range(cfg.mid_res_blocks))) for i in range(1, len(ch) - 1)
        )
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z_BDhw: torch.Tensor) -> torch.Tensor:
        h = self.res(self.conv_in(z_BDhw))
        for level in reversed(range(len(self.up))):
            h = F.silu(self.up[level](F.silu(h)))
            if level > 0:
                h = self.mid[level - 1](h)
        return self.conv_out(h)


class L2EMAQuantizer(nn.Module):
    """Cosine-similarity VQ over unit vectors, EMA codebook, dead-code restart (see the module docstring).

    Buffers (all saved, so a checkpoint can resume training): ``embed_KD`` the unit codebook, ``cluster_size_K`` the
    EMA count of vectors assigned per batch, ``embed_sum_KD`` the EMA sum of those vectors.
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float, restart_ratio: float) -> None:
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.decay, self.restart_ratio = decay, restart_ratio
        embed_KD = F.normalize(torch.randn(codebook_size, code_dim), dim=1)
        self.register_buffer("embed_KD", embed_KD)
        self.register_buffer("cluster_size_K", torch.ones(codebook_size))
        self.register_buffer("embed_sum_KD", embed_KD.clone())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids (any shape) -> unit vectors (``codes.shape + (D,)``)."""
        return F.embedding(codes, self.embed_KD)

    def nearest(self, z_ND: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes by cosine similarity; ``z_ND`` must already be unit vectors."""
        return (z_ND @ self.embed_KD.t()).argmax(dim=1)

    @torch.no_grad()
    def ema_update(self, z_ND: torch.Tensor, codes_N: torch.Tensor) -> int:
        """One EMA step of the codebook on a batch of unit vectors and their codes; returns how many codes restarted."""
        # Quantisation error of each vector under the codebook it was assigned with (1 - cosine similarity).
        err_N = 1.0 - (z_ND * self.embed_KD[codes_N]).sum(1)
        onehot_NK = F.one_hot(codes_N, self.codebook_size).to(z_ND.dtype)
        counts_K = onehot_NK.sum(0)
        self.cluster_size_K.mul_(self.decay).add_(counts_K, alpha=1 - self.decay)
        self.embed_sum_KD.mul_(self.decay).add_(onehot_NK.t() @ z_ND, alpha=1 - self.decay)
        # The codebook is the direction of the running mean; the norm of the sum carries no information here.
        self.embed_KD.copy_(F.normalize(self.embed_sum_KD, dim=1))
        return self.restart_dead_codes(z_ND, err_N)

    @torch.no_grad()
    def restart_dead_codes(self, z_ND: torch.Tensor, err_N: torch.Tensor | None = None) -> int:
        """Move every code whose EMA count is under ``restart_ratio * N / K`` onto a batch vector.

        With ``err_N`` (each vector's quantisation error) the vectors are drawn with probability proportional to
        their error, so restarted codes land where the codebook is worst (shape edges, rare colours) rather than on
        the flat background that dominates a uniform draw; without it the draw is uniform.
        """
        expected = z_ND.shape[0] / self.codebook_size
        dead_K = self.cluster_size_K < self.restart_ratio * expected
        num_dead = int(dead_K.sum())
        if num_dead == 0:
            return 0
        weights_N = torch.ones(z_ND.shape[0]) if err_N is None else err_N.float().clamp_min(1e-6)
        pick = torch.multinomial(weights_N, num_dead, replacement=num_dead > z_ND.shape[0]).to(z_ND.device)
        self.embed_KD[dead_K] = z_ND[pick]
        # Give the restarted code the average mass, so one unlucky batch does not restart it again at once.
        self.embed_sum_KD[dead_K] = z_ND[pick] * expected
        self.cluster_size_K[dead_K] = expected
        return num_dead

    def forward(self, z_BDhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise encoder output; returns (straight-through ``q_BDhw``, ``codes_Bhw``, commitment MSE)."""
        B, D, h, w = z_BDhw.shape
        # The lookup and the EMA statistics stay fp32 under bf16 autocast: bf16 cosine similarities tie often
        # enough to flip codes, and the EMA sums would lose their small updates.
        with torch.autocast(z_BDhw.device.type, enabled=False):
            z_ND = F.normalize(z_BDhw.float().permute(0, 2, 3, 1).reshape(-1, D), dim=1)  # (B*h*w, D) unit vectors
            codes_N = self.nearest(z_ND.detach())
            if self.training:
                self.ema_update(z_ND.detach(), codes_N)
            q_ND = self.lookup(codes_N)
            commit = F.mse_loss(z_ND, q_ND.detach())
            q_ND = z_ND + (q_ND - z_ND).detach()  # straight-through: forward uses q, gradient flows to z
        q_BDhw = q_ND.reshape(B, h, w, D).permute(0, 3, 1, 2)  # (B*h*w, D) -> (B, D, h, w)
        return q_BDhw, codes_N.reshape(B, h, w), commit


@dataclass
class VQOutput:
    """What :meth:`ShapesVQ.forward` returns for training: reconstruction, codes and the loss terms."""

    recon_BCHW: torch.Tensor
    codes_Bhw: torch.Tensor
    loss: torch.Tensor
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor


class ShapesVQ(ImageTokenizer):
    """The shapes world's image tokenizer: 64x64 RGB <-> a grid of codes (8x8 by default) from one codebook."""

    name = "shapes-vq"

    def __init__(self, config: ShapesVQConfig | None = None) -> None:
        super().__init__()
        self.config = config or ShapesVQConfig()
        self.level_sizes = (self.config.codebook_size,)
        self.encoder = Encoder(self.config)
        self.quantizer = L2EMAQuantizer(
            self.config.codebook_size, self.config.code_dim, self.config.ema_decay, self.config.restart_ratio
        )
        self.decoder = Decoder(self.config)

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def native_grid(self) -> tuple[int, int]:
        return self.config.grid

    # ------------------------------------------------------------------------------------------ training
    def forward(self, pixels_BCHW: torch.Tensor) -> VQOutput:
        """Reconstruct ``pixels_BCHW`` in [-1, 1]; loss = MSE + ``commitment_beta`` * commitment."""
        q_BDhw, codes_Bhw, commit = self.quantizer(self.encoder(pixels_BCHW))
        recon_BCHW = self.decoder(q_BDhw)
        recon_loss = F.mse_loss(recon_BCHW, pixels_BCHW)
        fit_loss = recon_loss
        if self.config.edge_loss_weight > 0:
            weight_B1HW = edge_weights(pixels_BCHW, self.config.edge_loss_weight)
            fit_loss = ((recon_BCHW - pixels_BCHW).pow(2) * weight_B1HW).mean() / weight_B1HW.mean()
        loss = fit_loss + self.config.commitment_beta * commit
        return VQOutput(recon_BCHW, codes_Bhw, loss, recon_loss.detach(), commit.detach())

    # ------------------------------------------------------------------------------------------ interface
    def preprocess(self, images: Sequence, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """PIL images -> ``pixels_BCHW`` in [-1, 1]: resize the shorter side to ``image_size``, then centre-crop."""
        if grid is not None and tuple(grid) != self.grid:
            raise ValueError(f"{self.name} has a fixed grid {self.grid}; got {grid=}")
        from PIL import Image  # here, not at module top: importing the model needs no PIL

        from modeling.vq.preprocess import resize_cover_crop, to_rgb

        size = self.config.image_size
        arrays = []
        for i, image in enumerate(images):
            if not hasattr(image, "convert"):
                raise TypeError(f"images[{i}] must be a PIL image, got {type(image).__name__}")
            # to_rgb: the one image normalisation (EXIF orientation, 16-bit, alpha onto white), not convert("RGB")
            image = resize_cover_crop(to_rgb(image), size, size, resample=Image.BICUBIC)
            arrays.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3))
        if not arrays:
            raise ValueError("preprocess got no images")
        return uint8_to_pixels(torch.stack(arrays).permute(0, 3, 1, 2))

    @torch.no_grad()
    def encode(self, pixels_BCHW: torch.Tensor) -> EncodedImages:
        size = self.config.image_size
        if pixels_BCHW.ndim != 4 or tuple(pixels_BCHW.shape[1:]) != (3, size, size):
            raise ValueError(f"encode expects pixels of shape (B, 3, {size}, {size}), got {tuple(pixels_BCHW.shape)}")
        z_BDhw = self.encoder(pixels_BCHW)
        B, D, h, w = z_BDhw.shape
        z_ND = F.normalize(z_BDhw.permute(0, 2, 3, 1).reshape(-1, D), dim=1)
        codes_BN = self.quantizer.nearest(z_ND).reshape(B, h * w)  # row-major raster order
        return EncodedImages(codes_BN, torch.zeros(h * w, dtype=torch.long), (h, w))

    @torch.no_grad()
    def decode(self, codes_BN: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        grid = tuple(grid) if grid is not None else self.grid
        if grid != self.grid:
            raise ValueError(f"{self.name} decodes only its own grid {self.grid}; got {grid=}")
        h, w = grid
        if codes_BN.ndim != 2 or codes_BN.shape[1] != h * w:
            raise ValueError(f"decode expects codes of shape (B, {h * w}) for {grid=}, got {tuple(codes_BN.shape)}")
        lo, hi = int(codes_BN.min()), int(codes_BN.max())
        if lo < 0 or hi >= self.config.codebook_size:
            raise ValueError(f"codes must be in [0, {self.config.codebook_size}), got range [{lo}, {hi}]")
        q_BDhw = self.quantizer.lookup(codes_BN.long()).reshape(-1, h, w, self.config.code_dim).permute(0, 3, 1, 2)
        return self.decoder(q_BDhw).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically (temp file + rename); sets ``checkpoint_hash``."""
        metadata = {"format": "pt", "tokenizer": self.name}
        return save_safetensors_dir(self, out_dir, self.config.to_dict(), metadata=metadata)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "ShapesVQ":
        """Strictly load a directory written by :meth:`save_pretrained`; errors name the path and the keys."""
        return load_safetensors_dir(cls, ShapesVQConfig, path, hint=" (write one with data_process/train_vq.py)")


def edge_weights(pixels_BCHW: torch.Tensor, edge_loss_weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``1 + edge_loss_weight * edge`` (B, 1, H, W), ``edge`` in [0, 1] the largest colour
    step to a 4-neighbour, spread over a 3x3 window so both sides of an edge and a corner's tip are covered.

    Why: plain MSE is dominated by flat background; what decides whether a reconstruction still shows the right
    object (a shape's corners, a small object's outline, its colour at the rim) lives on the edges.
    """
    with torch.no_grad():
        p = pixels_BCHW.float()
        dx_B1HW = (p[..., :, 1:] - p[..., :, :-1]).abs().amax(1, keepdim=True)
        dy_B1HW = (p[..., 1:, :] - p[..., :-1, :]).abs().amax(1, keepdim=True)
        edge_B1HW = torch.maximum(F.pad(dx_B1HW, (0, 1)), F.pad(dy_B1HW, (0, 0, 0, 1)))  # back to (B, 1, H, W)
        edge_B1HW = F.max_pool2d(edge_B1HW, 3, stride=1, padding=1).clamp(max=1.0)
        return 1.0 + edge_loss_weight * edge_B1HW


def uint8_to_pixels(images_BCHW: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_BCHW.float().div_(127.5).sub_(1.0)


def pixels_to_uint8(pixels_BCHW: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded (what a viewer would see; PSNR is measured on these)."""
    return ((pixels_BCHW.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def psnr_uint8(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 255] scale; identical images give +inf."""
    mse_B = (a_BCHW.float() - b_BCHW.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse_B)


__all__ = [
    "ShapesVQ", "ShapesVQConfig", "L2EMAQuantizer", "VQOutput", "uint8_to_pixels", "pixels_to_uint8", "psnr_uint8",
]
