"""Chameleon / Anole VQGAN (``vqgan.ckpt`` + ``vqgan.yaml``) as an :class:`ImageTokenizer`.

The network is taming-transformers' ``VQModel``: encoder (base 128 channels, multipliers [1, 1, 2, 2, 4], 2 res
blocks per level, down-sampling 16), ``quant_conv``, an 8192 x 256 codebook, ``post_quant_conv`` and the mirrored
decoder (``num_res_blocks + 1`` blocks per level, nearest up-sampling + 3x3 conv). 512 px -> a 32x32 code grid.

What is reused from transformers, checked layer by layer against taming's ``Encoder`` / ``Decoder``:

* ``ChameleonVQVAEEncoder`` and ``ChameleonVQVAEVectorQuantizer``: same modules, same attribute names, same forward
  (GroupNorm(32, eps 1e-6), swish, asymmetric-pad stride-2 downsample, ``attn_resolutions``-driven attention plus the
  mid-block attention at the lowest resolution). Their config, ``ChameleonVQVAEConfig``, defaults to Chameleon's.
* ``JanusVQVAEDecoder``: the same blocks in the same order as taming's ``Decoder``, with two differences handled
  here: (1) it stores the up levels in execution order (lowest resolution first, ``self.up.append``) while taming
  stores them by level (``self.up.insert(0, ...)``), so checkpoint key ``decoder.up.{i}`` maps to our
  ``decoder.up.{L-1-i}``; (2) it always puts attention after every block of the lowest level, while taming puts it
  where ``curr_res in attn_resolutions`` (Chameleon's ``vqgan.yaml`` lists none), so :class:`TamingDecoder` rebuilds
  those lists from ``attn_resolutions``. Janus' forward already skips empty attention lists.

Loading is strict (every encoder, quantizer and decoder key of the checkpoint used, none of ours missing, shapes
equal) and fails before any work with the missing / unexpected keys listed; the Lightning checkpoint's ``loss.*``
keys (LPIPS and discriminator) are training-only and ignored. Preprocessing is Chameleon's (see
:mod:`modeling.vq.preprocess`).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml
from loguru import logger
from torch import nn
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEEncoder, ChameleonVQVAEVectorQuantizer
from transformers.models.janus.modeling_janus import JanusVQVAEAttnBlock, JanusVQVAEDecoder

from modeling.vq.base import EncodedImages, ImageTokenizer, file_hash
from modeling.vq.preprocess import Preprocessor

IGNORED_CHECKPOINT_PREFIXES: tuple[str, ...] = ("loss.",)  # LPIPS + discriminator: training only
_DECODER_UP_RE = re.compile(r"^decoder\.up\.(\d+)\.")


def chameleon_vq_config(**overrides: Any) -> ChameleonVQVAEConfig:
    """Chameleon's architecture (transformers' defaults, no attention outside the mid blocks, 3 output channels)."""
    kwargs: dict[str, Any] = {"attn_resolutions": [], "out_channels": 3}
    kwargs.update(overrides)
    return ChameleonVQVAEConfig(**kwargs)


def config_from_yaml(path: str | os.PathLike) -> ChameleonVQVAEConfig:
    """Build the config from a taming ``vqgan.yaml`` (``model.params.{embed_dim, n_embed, ddconfig}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN config not found: {path}")
    with open(path) as f:
        doc = yaml.safe_load(f)
    try:
        params = doc["model"]["params"]
        dd = params["ddconfig"]
        return chameleon_vq_config(
            embed_dim=int(params["embed_dim"]),
            num_embeddings=int(params["n_embed"]),
            base_channels=int(dd["ch"]),
            channel_multiplier=[int(m) for m in dd["ch_mult"]],
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=[int(r) for r in dd.get("attn_resolutions") or []],
            latent_channels=int(dd["z_channels"]),
            double_latent=bool(dd.get("double_z", False)),
            resolution=int(dd["resolution"]),
            in_channels=int(dd.get("in_channels", 3)),
            out_channels=int(dd.get("out_ch", 3)),
            dropout=float(dd.get("dropout", 0.0)),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: model.params: missing or malformed field {e} (need embed_dim, n_embed and "
                         "ddconfig.{ch, ch_mult, num_res_blocks, z_channels, resolution})") from e


class TamingDecoder(JanusVQVAEDecoder):
    """Janus' decoder with taming's attention placement: after each block of a level whose resolution is listed in
    ``config.attn_resolutions`` (the mid-block attention is always there, as in taming)."""

    def __init__(self, config: ChameleonVQVAEConfig) -> None:
        super().__init__(config)
        attn_resolutions = set(config.attn_resolutions or [])
        levels = list(reversed(range(self.num_resolutions)))  # self.up[k] is level levels[k] (lowest res first)
        for k, i_level in enumerate(levels):
            curr_res = config.resolution // 2 ** i_level
            channels = config.base_channels * config.channel_multiplier[i_level]
            n_attn = self.num_res_blocks + 1 if curr_res in attn_resolutions else 0
            self.up[k].attn = nn.ModuleList([JanusVQVAEAttnBlock(channels) for _ in range(n_attn)])


def taming_to_ours(key: str, num_resolutions: int) -> str:
    """Checkpoint (taming) key -> our state-dict key. Only the decoder's up-level index differs (reversed)."""
    m = _DECODER_UP_RE.match(key)
    if m is None:
        return key
    return f"decoder.up.{num_resolutions - 1 - int(m.group(1))}." + key[m.end():]


def ours_to_taming(key: str, num_resolutions: int) -> str:
    """Inverse of :func:`taming_to_ours` (the map is an involution)."""
    return taming_to_ours(key, num_resolutions)


def key_mismatch_report(expected: Sequence[str], got: Sequence[str], source: str) -> str | None:
    """``None`` when the key sets are equal, else a message listing missing and unexpected keys (first 20 each)."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if not missing and not unexpected:
        return None

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "") if keys else "none"

    return f"{source}: checkpoint does not match the architecture: missing keys: {show(missing)}; " \
           f"unexpected keys: {show(unexpected)}"


def load_lightning_state_dict(path: str | os.PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)["state_dict"]`` (or the dict itself if it is a bare state dict).

    ``weights_only=False`` is the opt-in fallback for old Lightning checkpoints that pickle other objects: it runs
    the pickle's code, so use it only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
    if not weights_only:
        logger.warning(f"{path}: loading with weights_only=False (unpickles arbitrary objects; trusted files only)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"{path}: the checkpoint holds objects that weights_only=True refuses (an old Lightning checkpoint). "
            "If you trust the file, load it with ChameleonVQGAN.from_checkpoint(..., weights_only=False), or "
            "re-save its weights once: torch.save({'state_dict': torch.load(p, map_location='cpu', "
            "weights_only=False)['state_dict']}, q)"
        ) from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a Lightning checkpoint with a 'state_dict' of tensors")
    return dict(state)


class ChameleonVQGAN(ImageTokenizer):
    """Chameleon's / Anole's VQGAN: ``encoder -> quant_conv -> quantize``, ``quantize -> post_quant_conv -> decoder``.

    Frozen by convention (``eval()`` at construction): Chameleon never fine-tunes it.
    """

    name = "chameleon-vqgan"

    def __init__(self, config: ChameleonVQVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else chameleon_vq_config()
        cfg = self.config
        self.encoder = ChameleonVQVAEEncoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantize = ChameleonVQVAEVectorQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = TamingDecoder(cfg)
        self.level_sizes = (cfg.num_embeddings,)
        self.preprocessor = Preprocessor("fixed", cfg.resolution, self.downsample)
        self.eval()

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.channel_multiplier) - 1)

    @property
    def native_grid(self) -> tuple[int, int]:
        side = self.config.resolution // self.downsample
        return side, side

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def taming_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under the checkpoint's (taming) key names: what ``vqgan.ckpt["state_dict"]`` holds."""
        n = len(self.config.channel_multiplier)
        return {ours_to_taming(k, n): v for k, v in self.state_dict().items()}

    def load_taming_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "<state_dict>") -> None:
        """Strictly load taming-named weights; ``loss.*`` keys are dropped, anything else must match exactly."""
        n = len(self.config.channel_multiplier)
        kept = {taming_to_ours(k, n): v for k, v in state.items() if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
        ours = self.state_dict()
        report = key_mismatch_report(
            [ours_to_taming(k, n) for k in ours], [ours_to_taming(k, n) for k in kept], source
        )
        if report is not None:
            raise ValueError(report)
        bad_shapes = [f"{ours_to_taming(k, n)}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
                      for k, v in kept.items() if v.shape != ours[k].shape]
        if bad_shapes:
            raise ValueError(f"{source}: shape mismatch (wrong vqgan.yaml?): " + "; ".join(bad_shapes[:20]))
        self.load_state_dict(kept, strict=True)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike, config_path: str | os.PathLike | None = None,
                        weights_only: bool = True) -> "ChameleonVQGAN":
        """Load ``vqgan.ckpt`` (a local Lightning checkpoint); the architecture comes from ``config_path``
        (``vqgan.yaml``) when given, else from a ``vqgan.yaml`` next to the checkpoint, else Chameleon's defaults.
        A directory holding ``vqgan.ckpt`` (+ ``vqgan.yaml``) is accepted too. ``weights_only=False``: see
        :func:`load_lightning_state_dict` (trusted old checkpoints only)."""
        ckpt_path = Path(ckpt_path)
        if ckpt_path.is_dir():
            ckpt_path = ckpt_path / "vqgan.ckpt"
        if config_path is None and (ckpt_path.parent / "vqgan.yaml").is_file():
            config_path = ckpt_path.parent / "vqgan.yaml"
        config = config_from_yaml(config_path) if config_path is not None else chameleon_vq_config()
        state = load_lightning_state_dict(ckpt_path, weights_only)  # raises FileNotFoundError naming the path
        model = cls(config)
        model.load_taming_state_dict(state, source=str(ckpt_path))
        model.checkpoint_hash = file_hash(ckpt_path)
        logger.info(f"loaded {model.tokenizer_id} from {ckpt_path} (config: {config_path or 'Chameleon defaults'})")
        return model

    # -- ImageTokenizer ------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Chameleon's preprocessing (alpha onto white, shorter side to ``resolution`` with LANCZOS, centre crop,
        [-1, 1]); ``grid`` (code units) picks another size, the convolutional net handles any multiple of 16."""
        return self.preprocessor.batch(list(images), grid)

    @torch.no_grad()
    def encode(self, pixels_BCHW: torch.Tensor) -> EncodedImages:
        h, w = pixels_BCHW.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size must be a multiple of {self.downsample}, got {h}x{w}")
        param = self.quant_conv.weight
        z_BDhw = self.quant_conv(self.encoder(pixels_BCHW.to(param.device, param.dtype)))
        _, _, codes = self.quantize(z_BDhw)  # codes flattened in (b, h, w) raster order
        grid = (h // self.downsample, w // self.downsample)
        codes_BN = codes.view(pixels_BCHW.shape[0], grid[0] * grid[1])
        return EncodedImages(codes_BN, torch.zeros(codes_BN.shape[1], dtype=torch.long), grid)

    @torch.no_grad()
    def decode(self, codes_BN: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        gh, gw = grid
        if codes_BN.dim() != 2 or codes_BN.shape[1] != gh * gw:
            raise ValueError(f"codes_BN must be (B, {gh * gw}) for grid {grid}, got {tuple(codes_BN.shape)}")
        if codes_BN.numel() and (codes_BN.min() < 0 or codes_BN.max() >= self.config.num_embeddings):
            raise ValueError(f"codes out of range [0, {self.config.num_embeddings}): "
                             f"min {int(codes_BN.min())}, max {int(codes_BN.max())}")
        q_BhwD = self.quantize.embedding(codes_BN.to(self.quant_conv.weight.device).view(-1, gh, gw))
        q_BDhw = q_BhwD.permute(0, 3, 1, 2).contiguous()  # (B, h, w, D) -> (B, D, h, w)
        # clamped as the reference does before making a PIL image: the interface promises [-1, 1]
        return self.decoder(self.post_quant_conv(q_BDhw)).clamp(-1.0, 1.0)
