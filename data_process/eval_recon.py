"""Reconstruction quality of any registered image tokenizer: PSNR, SSIM, codebook usage, perplexity, rFID.

Usage::

    python data_process/eval_recon.py --tokenizer shapes --checkpoint outputs/shapes_vq --images data/shapes/images \
        --num_images 500 --batch_size 32 --out outputs/recon.json [--inception_path inception-2015-12-05.pt]

``--images`` is a folder (searched recursively for png/jpg/jpeg/webp/bmp, sorted), a ``.txt`` list of image paths
(one per line, relative to the list's folder), or a data config YAML (``data_process/data_config.py``): its
``image_folder`` and ``llava`` datasets contribute their image folders, ``webdataset`` ones their tar members.

Each image goes through the tokenizer's own ``preprocess`` (so the reference is exactly what the tokenizer sees),
``encode`` and ``decode``; images that share a code grid are batched together (any-resolution tokenizers give
per-image grids). Both the preprocessed input and the reconstruction are quantised to uint8 values before the
metrics (``data_range`` 255), as reconstructions are saved and compared in practice.

rFID runs only when ``--inception_path`` is given, and then needs a **TorchScript** feature extractor taking float
images in [0, 255] (NCHW, any size) and returning features: NVIDIA's ``inception-2015-12-05.pt`` (the TF-FID
Inception-v3 used by StyleGAN3 metrics and clean-fid; called with ``return_features=True``) or any scripted model.
pytorch-fid's ``pt_inception-*.pth`` is a state dict for torchvision's Inception-v3, and torchvision does not import
beside this torch build (DESIGN.md section 9), so that file is refused with a message saying so. FID over fewer than
~10k images is biased upwards: compare rFIDs only at equal ``num_images``.

The results JSON (settings included) is written atomically; the table goes to stdout. ``--table FILE.md`` keeps
one markdown table over runs: each run upserts its row keyed by (tokenizer, dataset) (``--dataset``, by default the
name of the ``--images`` folder, or its parent's when the folder is called ``images``), so tokenizers evaluated on
cc3m, ImageNet val and FFHQ folders end up compared in one table. ``--examples N`` (default 8) writes the first N
references above their reconstructions to ``<out>.png``, to look at.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import fire
import torch
from loguru import logger
from PIL import Image
from tqdm import tqdm

from data_process.converters import ImageSource as Location  # where an image's bytes are
from data_process.schema import atomic_write_text
from modeling.vq import EncodedImages, ImageTokenizer, load_image_tokenizer
from modeling.vq.metrics import CodeStats, FeatureMoments, frechet_distance, psnr, ssim
from modeling.vq.preprocess import group_by_grid

IMAGE_EXTS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageSource:
    """One image to evaluate: a display name and a loader (bytes are read only when the image is evaluated)."""

    name: str
    load: Callable[[], Image.Image]


def _source(location: Location) -> ImageSource:
    return ImageSource(location.label, location.open)  # the shared loading path (EXIF, 16-bit, alpha)


def folder_locations(folder: Path) -> list[Location]:
    """Every image file under ``folder`` (recursively: ImageNet val's class folders, FFHQ's), sorted by path."""
    return [Location(str(p)) for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in IMAGE_EXTS and p.is_file()]


def _folder_sources(folder: Path) -> list[ImageSource]:
    return [_source(location) for location in folder_locations(folder)]


def _tar_sources(tar_path: Path) -> list[ImageSource]:
    """Members of an uncompressed tar are located by offset (read later, without re-scanning the archive);
    a compressed tar cannot be seeked into, so its images are read now, in one pass."""
    try:
        tf, compressed = tarfile.open(tar_path, mode="r:"), False
    except tarfile.ReadError:
        tf, compressed = tarfile.open(tar_path, mode="r:*"), True
    with tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS),
                         key=lambda m: m.name)
        return [_source(Location(str(tar_path), m.name, m.offset_data, m.size,
                                 tf.extractfile(m).read() if compressed else None)) for m in members]


def _list_sources(list_path: Path) -> list[ImageSource]:
    sources = []
    for lineno, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line) if Path(line).is_absolute() else list_path.parent / line
        if not p.is_file():
            raise FileNotFoundError(f"{list_path}:{lineno}: image: file not found: {p}")
        sources.append(_source(Location(str(p))))
    return sources


def _data_config_sources(config_path: Path) -> list[ImageSource]:
    from data_process.data_config import load_data_config  # only this input form needs it

    sources: list[ImageSource] = []
    for spec in load_data_config(config_path).datasets:
        if spec.format in ("image_folder", "llava"):
            sources += _folder_sources(spec.image_root)
        elif spec.format == "webdataset":
            for tar_path in spec.shard_paths():
                sources += _tar_sources(tar_path)
        else:
            logger.info(f"{config_path}: dataset {spec.name!r} ({spec.format}) has no images to reconstruct; skipped")
    return sources


def collect_images(images: str | Path, num_images: int | None = None) -> list[ImageSource]:
    """Resolve ``--images`` (folder, ``.txt`` list or data config YAML) to at most ``num_images`` sources."""
    path = Path(images)
    if path.is_dir():
        sources = _folder_sources(path)
    elif path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        sources = _data_config_sources(path)
    elif path.is_file() and path.suffix.lower() == ".txt":
        sources = _list_sources(path)
    elif not path.exists():
        raise FileNotFoundError(f"--images: not found: {path}")
    else:
        raise ValueError(f"--images: {path} must be a folder, a .txt list of image paths or a data config .yaml")
    if not sources:
        raise ValueError(f"--images: no images ({', '.join(IMAGE_EXTS)}) found in {path}")
    return sources[:num_images] if num_images else sources


def load_feature_extractor(path: str | Path, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A TorchScript feature extractor: float NCHW images in [0, 255] -> (N, D) features."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception_path: not found: {path}")
    try:
        model = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise ValueError(
            f"--inception_path {path} is not a TorchScript module. Give NVIDIA's inception-2015-12-05.pt "
            "(StyleGAN3 / clean-fid FID Inception) or any scripted extractor; pytorch-fid's pt_inception .pth is a "
            "torchvision state dict and torchvision does not import with this torch build") from e

    def extract(images_BCHW: torch.Tensor) -> torch.Tensor:
        images_BCHW = images_BCHW.to(device)
        try:  # the FID Inception's signature: features instead of logits
            features = model(images_BCHW, return_features=True)
        except (RuntimeError, TypeError):
            features = model(images_BCHW)
        return features.reshape(images_BCHW.shape[0], -1)

    return extract


def to_uint8_values(pixels_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> float tensor of uint8 values (clamped, rounded), as a saved PNG would hold."""
    return ((pixels_BCHW.float().clamp(-1, 1) + 1.0) * 127.5).round()


def _batches(sources: Sequence[ImageSource], size: int) -> Iterator[Sequence[ImageSource]]:
    for i in range(0, len(sources), size):
        yield sources[i:i + size]


def reconstruct_groups(tokenizer: ImageTokenizer, pixels: Sequence[torch.Tensor]
                       ) -> Iterator[tuple[list[int], EncodedImages, torch.Tensor, torch.Tensor]]:
    """Encode and decode preprocessed images, batched by code grid: per group, the images' indices, their codes and
    the reference and reconstruction as uint8 values (the metrics' and the example picture's common path)."""
    for idx in group_by_grid(p.shape[-2:] for p in pixels).values():
        x_BCHW = torch.stack([pixels[i] for i in idx])
        enc = tokenizer.encode(x_BCHW)
        yield idx, enc, to_uint8_values(x_BCHW), to_uint8_values(tokenizer.decode(enc.codes_BN, enc.grid).cpu())


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: ImageTokenizer,
    sources: Sequence[ImageSource],
    batch_size: int = 32,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Encode + decode every image; return mean PSNR/SSIM, per-level usage and perplexity, rFID (or None)."""
    tokenizer.eval()
    stats = CodeStats(tokenizer.level_sizes)
    psnrs, ssims = [], []
    real_f, recon_f = FeatureMoments(), FeatureMoments()
    for chunk in tqdm(list(_batches(sources, batch_size)), desc="reconstruct", unit="batch"):
        pixels = []
        for src in chunk:
            try:
                pixels.append(tokenizer.preprocess([src.load()])[0])
            except (OSError, ValueError) as e:
                raise ValueError(f"{src.name}: cannot read or preprocess image: {e}") from e
        for _, enc, real, recon in reconstruct_groups(tokenizer, pixels):
            stats.update(enc.codes_BN, enc.levels_N)
            psnrs.append(psnr(real, recon, 255.0))
            ssims.append(ssim(real, recon, 255.0))
            if feature_extractor is not None:
                real_f.update(feature_extractor(real))
                recon_f.update(feature_extractor(recon))
    psnr_all, ssim_all = torch.cat(psnrs), torch.cat(ssims)
    rfid = None
    if feature_extractor is not None:
        rfid = frechet_distance(*real_f.mean_cov(), *recon_f.mean_cov())
    return {
        "num_images": len(sources),
        "psnr": float(psnr_all.mean()),
        # undefined when any image is reconstructed exactly (PSNR inf) or there is one image
        "psnr_std": float(psnr_all.std()) if psnr_all.numel() > 1 and psnr_all.isfinite().all() else None,
        "ssim": float(ssim_all.mean()),
        "codebook_usage": stats.usage(),
        "perplexity": stats.perplexity(),
        "level_sizes": list(tokenizer.level_sizes),
        "rfid": rfid,
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "skipped"
    return "inf" if math.isinf(x) else f"{x:.4f}"


def format_table(results: dict) -> str:
    """A two-column text table of the headline figures."""
    rows = [("tokenizer", results["tokenizer"]), ("images", str(results["num_images"])),
            ("PSNR (dB)", _fmt(results["psnr"])), ("SSIM", _fmt(results["ssim"]))]
    for level, (u, p) in enumerate(zip(results["codebook_usage"], results["perplexity"])):
        k = results["level_sizes"][level]
        rows += [(f"usage L{level} (K={k})", f"{100 * u:.2f}%"), (f"perplexity L{level}", f"{p:.1f}")]
    rows.append(("rFID", _fmt(results["rfid"]) if results["rfid"] is not None else results["rfid_status"]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


TABLE_HEADER = ("| tokenizer | dataset | images | PSNR (dB) | SSIM | usage per level (%) | perplexity per level "
                "| rFID |\n|---|---|---|---|---|---|---|---|")


def markdown_row(results: dict, dataset: str) -> str:
    """One row of :data:`TABLE_HEADER` for ``results`` (of :func:`run`) on ``dataset``."""
    usage = "/".join(f"{100 * u:.1f}" for u in results["codebook_usage"])
    ppl = "/".join(f"{p:.1f}" for p in results["perplexity"])
    rfid = _fmt(results["rfid"]) if results["rfid"] is not None else "-"
    return (f"| {results['tokenizer']} | {dataset} | {results['num_images']} | {_fmt(results['psnr'])} | "
            f"{_fmt(results['ssim'])} | {usage} | {ppl} | {rfid} |")


def upsert_table(path: Path, row: str) -> str:
    """Write ``path`` (header + rows) with ``row`` replacing the row of the same (tokenizer, dataset); atomic."""
    key = lambda line: tuple(cell.strip() for cell in line.strip("|").split("|")[:2])  # noqa: E731
    rows = []
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines[:2] != TABLE_HEADER.splitlines():
            raise ValueError(f"{path}: not a table written by eval_recon (its first two lines differ from the "
                             "header); give another --table")
        rows = [line for line in lines[2:] if line.strip() and key(line) != key(row)]
    text = "\n".join([TABLE_HEADER, *sorted(rows + [row], key=key)]) + "\n"
    atomic_write_text(path, text)
    return text


@torch.no_grad()
def save_examples(tokenizer: ImageTokenizer, sources: Sequence[ImageSource], path: Path) -> None:
    """References (top row) above their reconstructions (bottom row), at the tokenizer's own preprocessing."""
    from data_process.schema import atomic_path

    pixels = [tokenizer.preprocess([src.load()])[0] for src in sources]
    pairs = []
    for idx, _, real, recon in reconstruct_groups(tokenizer, pixels):
        pairs += zip(idx, real, recon)
    pairs.sort(key=lambda t: t[0])
    h = max(real.shape[1] for _, real, _ in pairs)
    widths = [real.shape[2] for _, real, _ in pairs]
    canvas = Image.new("RGB", (sum(widths) + 2 * (len(pairs) - 1), 2 * h + 2), "white")
    x = 0
    for (_, real, recon), w in zip(pairs, widths):
        for row, img in enumerate((real, recon)):
            canvas.paste(Image.fromarray(img.permute(1, 2, 0).to(torch.uint8).numpy()), (x, row * (h + 2)))
        x += w + 2
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def dataset_name(images: str) -> str:
    """The default ``--dataset``: the ``--images`` folder's (or list's) name, its parent's for a folder ``images``."""
    p = Path(images)
    stem = p.stem if p.is_file() else p.name
    return p.parent.name if stem == "images" and p.parent.name else stem


def _jsonable(x):
    """JSON has no inf (identical images give PSNR inf): store it as the string "inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def run(
    tokenizer: str,
    checkpoint: str,
    images: str,
    num_images: int = 500,
    batch_size: int = 32,
    out: str = "outputs/recon.json",
    inception_path: str | None = None,
    device: str = "cpu",
    dataset: str | None = None,
    table: str | None = None,
    examples: int = 8,
) -> dict:
    """Load, evaluate, write ``out`` atomically (and the ``table`` row, the ``examples`` picture); return the
    results dict (the CLI's work minus printing)."""
    if batch_size < 1 or num_images < 1:
        raise ValueError(f"batch_size and num_images must be >= 1, got {batch_size=}, {num_images=}")
    sources = collect_images(images, num_images)
    tok = load_image_tokenizer(tokenizer, checkpoint).to(device)
    extractor = load_feature_extractor(inception_path, device) if inception_path else None
    if extractor is None:
        logger.info("rFID skipped: no --inception_path given")
    results = evaluate_reconstruction(tok, sources, batch_size, extractor)
    results["tokenizer"] = tok.tokenizer_id
    results["rfid_status"] = f"computed with {inception_path}" if extractor else "skipped (no --inception_path)"
    results["dataset"] = dataset or dataset_name(images)
    results["settings"] = {"tokenizer": tokenizer, "checkpoint": str(checkpoint), "images": str(images),
                           "num_images": num_images, "batch_size": batch_size, "inception_path": inception_path,
                           "device": device, "metric_range": "uint8 values, data_range 255",
                           "ssim": "gaussian 11x11 sigma 1.5, per channel"}
    out_path = Path(out)
    atomic_write_text(out_path, json.dumps(_jsonable(results), indent=2) + "\n")
    logger.info(f"wrote {out_path}")
    if examples > 0:
        save_examples(tok, sources[:examples], out_path.with_suffix(".png"))
        logger.info(f"wrote {out_path.with_suffix('.png')}: {min(examples, len(sources))} references above their "
                    "reconstructions")
    if table:
        upsert_table(Path(table), markdown_row(results, results["dataset"]))
        logger.info(f"updated {table}")
    return results


def main(
    tokenizer: str,
    checkpoint: str,
    images: str,
    num_images: int = 500,
    batch_size: int = 32,
    out: str = "outputs/recon.json",
    inception_path: str | None = None,
    device: str = "cpu",
    dataset: str | None = None,
    table: str | None = None,
    examples: int = 8,
    threads: int = 2,
) -> None:
    """CLI: evaluate and print the table and its markdown row (see the module docstring)."""
    torch.set_num_threads(threads)
    results = run(tokenizer, checkpoint, images, num_images, batch_size, out, inception_path, device, dataset, table,
                  examples)
    print(format_table(results))  # the CLI's output; logs go to stderr
    print(f"\n{TABLE_HEADER}\n{markdown_row(results, results['dataset'])}")


if __name__ == "__main__":
    fire.Fire(main)
