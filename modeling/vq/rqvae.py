"""RQ-VAE (Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization"): each grid position is
``depth`` codes, code ``d`` quantising what codes ``0..d-1`` left over.

Residual quantisation (:class:`ResidualQuantizer`): with ``r_0 = z`` (the encoder vector of a position),
``k_d = argmin_k |r_d - e_k|`` and ``r_{d+1} = r_d - e_{k_d}``; the position's latent is ``sum_d e_{k_d}``.
Why residuals rather than a bigger grid or codebook: ``depth`` codes of ``K`` entries give ``K ** depth`` latents
per position at the cost of ``depth`` tokens, coarse to fine, so a short sequence still reconstructs sharply.

* One codebook shared by every depth (the paper's default: a code means the same vector at every depth, and the
  residual norm shrinks with depth) or, ``shared_codebook=False``, one per depth.
* Euclidean codebook (residuals are not unit vectors, unlike ShapesVQ's cosine codes) updated by EMA with
  dead-code restarts (:class:`EuclideanEMACodebook`, reusing :class:`~modeling.vq.shapes_vq.L2EMAQuantizer`'s
  restart rule); the residuals of each depth are gathered over a ``torch.distributed`` group (:func:`gather_rows`)
  and every rank runs the same EMA update and restart draw (same RNG) on the global batch, so N processes update the codebook exactly as one process
  does on their concatenated batch.
* Commitment loss ``beta * mean_d |z - sg(sum_{j<=d} e_{k_j})|^2`` (the paper's, averaged over depths);
  straight-through estimator for the encoder gradient.
* Encoder and decoder are the shapes VQ's convolutional stacks (:mod:`modeling.vq.shapes_vq`: thin at full
  resolution, residual blocks at the grid); ``channels`` sets the resolution ladder as there.

Serialisation (:func:`serialize` / :func:`deserialize`): **depth-first per position**, as RQ-Transformer: positions
in raster order, and at each position its ``depth`` codes from coarse (depth 0) to fine. An 8x8 grid of depth 4
gives ``8 * 8 * 4 = 256`` codes with levels ``[0, 1, 2, 3] * 64``; ``grid`` is the position grid. Level ``d`` is depth
``d``, so each depth has its own token-id range in :class:`modeling.vocab.CodeVocab` (``level_sizes = (K,) * depth``,
even with a shared codebook): the autoregressive model and the constrained sampler always know which depth comes
next, and training, packing, generation and decoding go through the same level machinery as HQ-VAE.

Checkpoints are a directory: ``config.json`` (:class:`RQVAEConfig`) + ``model.safetensors`` (EMA buffers included,
so training can resume from them), loaded strictly.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from modeling.vq.base import (
    EncodedImages,
    ImageTokenizer,
    config_from_dict,
    load_safetensors_dir,
    save_safetensors_dir,
)
from modeling.vq.preprocess import Preprocessor
from modeling.vq.shapes_vq import NORMS, ConvGridGeometry, Decoder, Encoder, L2EMAQuantizer, VQOutput


# -- serialisation (pure) ----------------------------------------------------------------------------------------
def serialize(codes_BhwD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, h, w, D)`` codes -> ``(codes_BN, levels_N)``, depth-first per raster position.

    >>> codes = torch.tensor([[[[1, 2], [3, 4]]]])             # B=1, 1x2 grid, depth 2
    >>> serialize(codes)[0].tolist(), serialize(codes)[1].tolist()
    ([[1, 2, 3, 4]], [0, 1, 0, 1])
    """
    b, h, w, depth = codes_BhwD.shape
    return codes_BhwD.reshape(b, h * w * depth), serialized_levels(h * w, depth)


def serialized_levels(num_positions: int, depth: int) -> torch.Tensor:
    """``[0, 1, ..., depth - 1] * num_positions``: the level (depth) of each serialised code."""
    return torch.arange(depth, dtype=torch.long).repeat(num_positions)


def deserialize(codes_BN: torch.Tensor, grid: tuple[int, int], depth: int) -> torch.Tensor:
    """Inverse of :func:`serialize`: ``codes_BN`` + ``grid`` -> ``(B, h, w, depth)``."""
    h, w = (int(x) for x in grid)
    if codes_BN.dim() != 2 or codes_BN.shape[1] != h * w * depth:
        raise ValueError(f"codes_BN must be (B, {h * w * depth}) for grid {(h, w)} and depth {depth}, "
                         f"got {tuple(codes_BN.shape)}")
    return codes_BN.reshape(codes_BN.shape[0], h, w, depth)


# -- config --------------------------------------------------------------------------------------------------------
@dataclass
class RQVAEConfig(ConvGridGeometry):
    """Architecture of :class:`RQVAE`; saved as ``config.json``.

    ``channels[i]`` is the width at resolution ``image_size / 2**i`` (``len(channels) - 1`` stride-2 stages), as in
    :class:`~modeling.vq.shapes_vq.ShapesVQConfig`: the default maps 64x64 images to an 8x8 grid of 4 codes from one
    512-entry codebook; for 256 px photos use e.g. ``image_size=256, channels=(64, 128, 128, 256, 256, 256)``.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (16, 48, 128, 128)
    enc_res_blocks: int = 0
    # 2, not 4: the same gate figures on the shapes world (98.8% detector, 40.9 dB) at 0.22 instead
    # of 0.26 s/step in fp32, which keeps the default run under 10 minutes on 2 cores without native bf16
    dec_res_blocks: int = 2
    mid_res_blocks: int = 0
    depth: int = 4
    codebook_size: int = 512
    code_dim: int = 16
    shared_codebook: bool = True
    commitment_beta: float = 0.25
    ema_decay: float = 0.95
    restart_ratio: float = 0.1  # a code is dead when its EMA count < restart_ratio * (vectors per update / K)
    norm: str = "channel"

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 2 or any(c <= 0 for c in self.channels):
            raise ValueError(f"RQVAEConfig.channels must list >= 2 positive widths, got {self.channels=}")
        if self.image_size % self.downsample:
            raise ValueError(f"RQVAEConfig.image_size must be a multiple of the stride {self.downsample} "
                             f"(from {len(self.channels)=}), got {self.image_size=}")
        if self.depth < 1 or self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError(f"RQVAEConfig: need depth >= 1, codebook_size >= 2, code_dim >= 1, got {self.depth=}, "
                             f"{self.codebook_size=}, {self.code_dim=}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"RQVAEConfig.ema_decay must be in (0, 1), got {self.ema_decay=}")
        if self.norm not in NORMS:
            raise ValueError(f"RQVAEConfig.norm must be one of {sorted(NORMS)}, got {self.norm=}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "RQVAEConfig":
        return config_from_dict(cls, d, source)


# -- quantiser -----------------------------------------------------------------------------------------------------
def gather_rows(x_N: torch.Tensor) -> torch.Tensor:
    """The rows of every rank of the ``torch.distributed`` group, in rank order (``x_N`` itself without a group).

    Each rank holds a contiguous slice of the global batch, so the result is what one process sees on that batch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x_N
    parts = [torch.empty_like(x_N) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_N.contiguous())
    return torch.cat(parts)


class EuclideanEMACodebook(L2EMAQuantizer):
    """A Euclidean codebook (nearest by L2 distance) whose entries are EMA cluster means, with dead-code restarts.

    Same buffers and restart rule as :class:`L2EMAQuantizer`; differences: no normalisation, the counts start at
    zero so the first update restarts the unused codes onto data vectors (a data-dependent init: random Gaussian
    codes far from small residuals would stay dead).
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float, restart_ratio: float) -> None:
        super().__init__(codebook_size, code_dim, decay, restart_ratio)
        self.cluster_size_K.zero_()

    def nearest(self, z_ND: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes by Euclidean distance (``|e|^2 - 2 z.e``; ``|z|^2`` does not change the argmin)."""
        return (self.embed_KD.pow(2).sum(1) - 2.0 * z_ND @ self.embed_KD.t()).argmin(dim=1)

    @torch.no_grad()
    def ema_update(self, z_ND: torch.Tensor, codes_N: torch.Tensor) -> int:
        """One EMA step on vectors and their codes (the caller gathers them over ranks); returns how many codes
        restarted."""
        err_N = (z_ND - self.embed_KD[codes_N]).pow(2).sum(1)
        onehot_NK = F.one_hot(codes_N, self.codebook_size).to(z_ND.dtype)
        self.cluster_size_K.mul_(self.decay).add_(onehot_NK.sum(0), alpha=1 - self.decay)
        self.embed_sum_KD.mul_(self.decay).add_(onehot_NK.t() @ z_ND, alpha=1 - self.decay)
        used_K = self.cluster_size_K > 1e-8
        self.embed_KD[used_K] = self.embed_sum_KD[used_K] / self.cluster_size_K[used_K, None]
        return self.restart_dead_codes(z_ND, err_N)


class ResidualQuantizer(nn.Module):
    """``depth`` rounds of nearest-code quantisation of the residual; one shared codebook or one per depth."""

    def __init__(self, cfg: RQVAEConfig) -> None:
        super().__init__()
        self.depth = cfg.depth
        n_books = 1 if cfg.shared_codebook else cfg.depth
        self.codebooks = nn.ModuleList(
            EuclideanEMACodebook(cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.restart_ratio)
            for _ in range(n_books))

    def book(self, d: int) -> EuclideanEMACodebook:
        return self.codebooks[d if len(self.codebooks) > 1 else 0]

    def lookup_sum(self, codes_BhwD: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, D)`` codes -> the summed latent ``(B, code_dim, h, w)``."""
        q = sum(self.book(d).lookup(codes_BhwD[..., d]) for d in range(self.depth))
        return q.permute(0, 3, 1, 2)

    def forward(self, z_BDhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (straight-through latent ``(B, code_dim, h, w)``, codes ``(B, h, w, depth)``, commitment MSE).

        All depths are coded with the codebooks as they were before this call; the EMA updates (one per codebook,
        over every depth's residuals that used it) follow, in training mode only.
        """
        B, C, h, w = z_BDhw.shape
        with torch.autocast(z_BDhw.device.type, enabled=False):  # fp32 lookups and EMA sums (see L2EMAQuantizer)
            z_NC = z_BDhw.float().permute(0, 2, 3, 1).reshape(-1, C)
            residual, q_sum = z_NC.detach(), torch.zeros_like(z_NC)
            codes, commit, seen = [], z_NC.new_zeros(()), {}
            for d in range(self.depth):
                book = self.book(d)
                idx = book.nearest(residual)
                q = book.lookup(idx)
                if self.training:  # the global batch of this depth, as one process would hold it
                    seen.setdefault(id(book), (book, [], []))[1].append(gather_rows(residual))
                    seen[id(book)][2].append(gather_rows(idx))
                q_sum = q_sum + q
                residual = residual - q
                codes.append(idx)
                commit = commit + F.mse_loss(z_NC, q_sum.detach())
            if self.training:
                for book, vecs, idxs in seen.values():
                    book.ema_update(torch.cat(vecs), torch.cat(idxs))
            q_st = z_NC + (q_sum - z_NC).detach()
        codes_BhwD = torch.stack(codes, dim=1).reshape(B, h, w, self.depth)
        return q_st.reshape(B, h, w, C).permute(0, 3, 1, 2), codes_BhwD, commit / self.depth


# -- model ---------------------------------------------------------------------------------------------------------
class RQVAE(ImageTokenizer):
    """Conv encoder -> residual quantiser (``depth`` codes per position) -> conv decoder."""

    name = "rqvae"

    def __init__(self, config: RQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else RQVAEConfig()
        self.encoder = Encoder(cfg)  # duck-typed: reads channels, code_dim, *_res_blocks, norm
        self.quantizer = ResidualQuantizer(cfg)
        self.decoder = Decoder(cfg)
        self.level_sizes = (cfg.codebook_size,) * cfg.depth
        self.preprocessor = Preprocessor("fixed", cfg.image_size, cfg.downsample)

    @property
    def native_grid(self) -> tuple[int, int]:
        return self.config.grid

    def code_levels(self, grid: tuple[int, int]) -> torch.Tensor:
        """Depth-first per position: ``[0, 1, ..., depth - 1]`` for each position of ``grid``."""
        return serialized_levels(int(grid[0]) * int(grid[1]), self.config.depth)

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight: where taming's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    # -- training ------------------------------------------------------------------------------------------------
    def forward(self, pixels_BCHW: torch.Tensor) -> VQOutput:
        """Reconstruction and the loss ``MSE + commitment_beta * commitment`` (the trainer adds its own terms to
        ``recon_BCHW`` and ``commit_loss``); ``codes_Bhw`` holds ``(B, h, w, depth)``."""
        q, codes_BhwD, commit = self.quantizer(self.encoder(pixels_BCHW))
        recon = self.decoder(q)
        mse = F.mse_loss(recon.float(), pixels_BCHW.float())
        return VQOutput(recon, codes_BhwD, mse + self.config.commitment_beta * commit, mse.detach(), commit)

    # -- ImageTokenizer ------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Shorter side to ``image_size``, centre crop, [-1, 1] (the shared :class:`Preprocessor`)."""
        if grid is not None and tuple(grid) != self.native_grid:
            raise ValueError(f"{self.name} has a fixed grid {self.native_grid}; got {grid=}")
        return self.preprocessor.batch(list(images), grid)

    @torch.no_grad()
    def encode(self, pixels_BCHW: torch.Tensor) -> EncodedImages:
        size = self.config.image_size
        if pixels_BCHW.ndim != 4 or tuple(pixels_BCHW.shape[1:]) != (3, size, size):
            raise ValueError(f"encode expects pixels of shape (B, 3, {size}, {size}), got {tuple(pixels_BCHW.shape)}")
        was_training = self.training
        self.eval()  # never move the codebook while encoding
        try:
            _, codes_BhwD, _ = self.quantizer(self.encoder(pixels_BCHW.to(self.decoder.conv_out.weight)))
        finally:
            self.train(was_training)
        codes_BN, levels_N = serialize(codes_BhwD)
        return EncodedImages(codes_BN, levels_N, self.config.grid)

    @torch.no_grad()
    def decode(self, codes_BN: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        grid = tuple(grid) if grid is not None else self.config.grid
        if grid != self.config.grid:
            raise ValueError(f"{self.name} decodes only its own grid {self.config.grid}; got {grid=}")
        codes_BhwD = deserialize(codes_BN.to(self.decoder.conv_out.weight.device).long(), grid, self.config.depth)
        k = self.config.codebook_size
        if codes_BhwD.numel() and (codes_BhwD.min() < 0 or codes_BhwD.max() >= k):
            raise ValueError(f"codes must be in [0, {k}), got range [{int(codes_BhwD.min())}, {int(codes_BhwD.max())}]")
        return self.decoder(self.quantizer.lookup_sum(codes_BhwD)).clamp(-1.0, 1.0)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically; sets ``checkpoint_hash``."""
        return save_safetensors_dir(self, out_dir, self.config.to_dict(), metadata={"format": "pt",
                                                                                    "tokenizer": self.name})

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "RQVAE":
        """Strictly load a :meth:`save_pretrained` directory; errors name the path and the offending keys."""
        model = load_safetensors_dir(cls, RQVAEConfig, path,
                                     hint=" (write one with data_process/train_tokenizer.py --kind rqvae)")
        logger.info(f"loaded {model.tokenizer_id} from {path}")
        return model


__all__ = ["RQVAE", "RQVAEConfig", "ResidualQuantizer", "EuclideanEMACodebook", "gather_rows", "serialize", "deserialize",
           "serialized_levels"]
