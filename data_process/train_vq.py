"""Train the shapes world's VQ tokenizer (:class:`modeling.vq.shapes_vq.ShapesVQ`) from scratch on CPU.

    python data_process/train_vq.py --out_dir data/shapes/vq --num_train 20000 --time_budget_s 270 --seed 0

How it stays inside a few minutes on 2 cores:

* The world is deterministic, so the training and held-out images are rendered once into a uint8 tensor and cached
  under ``out_dir/cache/`` (keyed by the world's source hash, seed, size and indices); batches are slices of it.
* The model is thin at 64x64 and wide at 16x16 (see ``modeling/vq/shapes_vq.py``) and runs under bf16 autocast
  where the CPU has native bf16 (``precision="auto"``), which measured ~1.7x faster than fp32 on the 2-core AVX-512
  box. Encoding and evaluation always run in fp32.
* Two budgets: ``max_steps`` and ``time_budget_s`` (a hard stop). The default ``lr_schedule="time"`` runs the cosine
  on ``max(step progress, elapsed / time_budget_s)``: on a slow or shared machine the decay still completes when the
  budget runs out, so the model is finished rather than cut mid-schedule (measured: a step schedule cut at step 71
  of 1,100 by the 270 s budget left a 22.6 dB model). The price is that the run depends on the machine's speed
  wherever the time term leads (also briefly after warmup on a fast machine). ``lr_schedule="steps"`` ignores time
  (bit-exact for a given seed and thread count; the budget may then cut it).
* Threads: ``num_threads=None`` takes 2 when the 1-minute load average leaves two cores idle and 1 otherwise. On the
  shared 2-core box two OpenMP threads under load spin-wait for each other: 3.9 s/step with 2 threads against
  1.15 s/step with 1 at load ~5. Bit-exact reproduction needs the same ``num_threads`` (it is in metrics.json).

Measured (held-out: 1,000 images at indices from 10,000,000; a shared 2-core box, so wall times are noisy and
pessimistic; ``num_threads=None`` chose 1 thread each time because of the load):

* the exact default command above (codebook 512), load ~2.8: all 800 steps in 247 s (0.31 s/step, 104 img/s),
  wall 261 s including 6 s of rendering; held-out PSNR 35.51 dB (5th percentile 31.4), usage 100% (512/512).
* the same command with the earlier 1,024-code default, load ~5-6 (plus a second run of mine beside it): the budget
  stopped it at step 255 of 800 with the time-scaled cosine finished: 29.45 dB (5th percentile 26.0), usage 100%,
  wall 320 s (27 s rendering). The gray background carries that PSNR: shapes stay recognisable but small ones lose
  their corners, so on a loaded machine raise ``--time_budget_s``.
* full 800-step schedules, ``--time_budget_s 3000 --num_threads 1``: 512 codes 35.63 dB, 1,024 codes 34.98 dB, both
  100% usage (hence 512: no loss in PSNR and half the image vocabulary for the LLM); 1,100 steps with 1,024 codes,
  lr 2e-3 (1e-3): 37.9 (36.5) dB.
* per step (32 images, bf16 autocast): 0.31-0.41 CPU-s on 1 thread; with 2 threads on an idle box expect ~0.2 s
  (bf16 batch 64 took 0.37 s with 2 threads at load ~1), i.e. ~160 s for the 800 steps.

Determinism and resumption: batch ``i`` is drawn from a generator seeded with ``(seed, i)`` and the full training
state (model, EMA codebook, optimizer, RNG, elapsed time) is saved atomically every ``save_every`` steps, so a rerun
after an interruption continues where it stopped. The final ``model.safetensors``, ``config.json`` and
``metrics.json`` are written atomically; a rerun on a finished ``out_dir`` with the same settings does nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from tqdm import tqdm

from data_process.schema import atomic_path, atomic_write_text
from modeling.vq.shapes_vq import ShapesVQ, ShapesVQConfig, pixels_to_uint8, psnr_uint8, uint8_to_pixels

METRICS_NAME = "metrics.json"
STATE_NAME = "train_state.pt"
# Held-out images come from the same world at indices no training run reaches, so the evaluation set does not
# depend on ``num_train`` and can never overlap the training images.
EVAL_INDEX_OFFSET = 10_000_000


@dataclass
class TrainVQConfig:
    """Everything that determines the trained weights (compared on rerun to decide "already done")."""

    num_train: int = 20000
    num_eval: int = 1000
    seed: int = 0
    batch_size: int = 32
    max_steps: int = 800
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_schedule: Literal["steps", "time"] = "time"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    model: ShapesVQConfig = field(default_factory=ShapesVQConfig)

    def __post_init__(self) -> None:
        if self.num_train < self.batch_size:
            raise ValueError(f"num_train must be >= batch_size, got {self.num_train=}, {self.batch_size=}")
        if self.num_train > EVAL_INDEX_OFFSET:
            raise ValueError(f"num_train must be <= {EVAL_INDEX_OFFSET} (held-out indices start there)")
        if self.num_eval < 1 or self.max_steps < 1:
            raise ValueError(f"num_eval and max_steps must be >= 1, got {self.num_eval=}, {self.max_steps=}")
        if self.lr_schedule not in ("steps", "time"):
            raise ValueError(f"lr_schedule must be 'steps' or 'time', got {self.lr_schedule=}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision=}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"need 0 <= warmup_steps < max_steps, got {self.warmup_steps=}, {self.max_steps=}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


# ---------------------------------------------------------------------------------------------- data
def _world_class():
    """The shapes world, imported lazily (it is a sibling module that tests may replace)."""
    from data_process.shapes_world import ShapesWorld

    return ShapesWorld


def render_images(world, indices: range, desc: str) -> torch.Tensor:
    """Render ``world.scene(i)`` for each index into a uint8 tensor (N, 3, H, W)."""
    size = world.image_size
    out = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    for row, index in enumerate(tqdm(indices, desc=desc, unit="img", mininterval=2.0)):
        image = world.render(world.scene(index)).convert("RGB")
        if image.size != (size, size):
            raise ValueError(f"ShapesWorld.render(scene({index})) gave size {image.size}, expected {(size, size)}")
        out[row] = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return out


def world_source_hash(world) -> str:
    """Hash of the source files next to the world's class (its whole package), so editing the renderer
    invalidates cached images; a world without a source file is keyed on its class name."""
    h = hashlib.sha256(type(world).__qualname__.encode())
    module_file = getattr(sys.modules.get(type(world).__module__), "__file__", None)
    if module_file:
        for path in sorted(Path(module_file).parent.glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def cached_images(cache_dir: Path, world, indices: range, desc: str) -> torch.Tensor:
    """Render once and cache under ``cache_dir``, keyed by the world's source, seed, size and the indices."""
    key = hashlib.sha256(
        f"{world_source_hash(world)}|{getattr(world, 'seed', None)}|{world.image_size}|{indices.start}|{indices.stop}"
        .encode()
    ).hexdigest()[:16]
    path = cache_dir / f"{desc}-{len(indices)}-{key}.pt"
    if path.exists():
        images = torch.load(path, weights_only=True)
        if images.shape[0] == len(indices):
            logger.info(f"loaded {len(indices)} pre-rendered {desc} images from {path}")
            return images
        logger.warning(f"{path}: cached tensor has {images.shape[0]} images, expected {len(indices)}; re-rendering")
    images = render_images(world, indices, desc)
    with atomic_path(path) as tmp:
        torch.save(images, tmp)
    return images


# ---------------------------------------------------------------------------------------------- training
def resolve_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype for training, or None for fp32; ``auto`` uses bf16 only where the CPU has it natively."""
    if precision == "fp32":
        return None
    native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if precision == "bf16" or native:
        if not native:
            logger.warning("precision='bf16' on a CPU without native bf16: it will be emulated and slow")
        return torch.bfloat16
    return None


def pick_num_threads(max_threads: int = 2) -> int:
    """``max_threads`` when the 1-minute load leaves that many cores idle, else 1 (see the module docstring)."""
    cores = os.cpu_count() or 1
    idle = cores - os.getloadavg()[0]
    threads = max_threads if idle >= max_threads - 0.5 else 1
    logger.info(f"using {threads} thread(s): {cores} cores, 1-minute load {os.getloadavg()[0]:.2f}")
    return min(threads, cores)


def lr_at(cfg: TrainVQConfig, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr`` as ``progress`` -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def batch_indices(cfg: TrainVQConfig, step: int) -> torch.Tensor:
    """The images of batch ``step``: a function of (seed, step) only, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, cfg.num_train, (cfg.batch_size,), generator=g)


def _save_state(path: Path, model: ShapesVQ, opt: torch.optim.Optimizer, step: int, elapsed: float, cfg: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed,
                    "rng": torch.get_rng_state(), "config": cfg}, tmp)


def train_loop(
    model: ShapesVQ,
    images_train: torch.Tensor,
    cfg: TrainVQConfig,
    time_budget_s: float,
    state_path: Path | None = None,
    save_every: int = 200,
) -> dict:
    """Train ``model`` in place on uint8 ``images_train``; resumes from ``state_path`` when it holds a state.

    Returns a summary: steps done, training seconds (this run plus resumed ones), images/s, first/last losses,
    whether the time budget cut the schedule.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start_step, elapsed_before = 0, 0.0
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state["config"] != cfg.to_dict():
            raise ValueError(f"{state_path}: saved by a run with other settings; delete it or use another out_dir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        logger.info(f"resuming from {state_path} at step {start_step} ({elapsed_before:.0f}s already trained)")
    autocast_dtype = resolve_precision(cfg.precision)
    model.train()
    losses: list[float] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    step = start_step
    cut = False
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train vq", unit="step", mininterval=2.0)
    while step < cfg.max_steps:
        elapsed = elapsed_before + time.perf_counter() - t0
        if elapsed >= time_budget_s:
            cut = True
            unfinished = "" if cfg.lr_schedule == "time" else "; the cosine did not finish (try lr_schedule='time')"
            logger.warning(f"time budget {time_budget_s:.0f}s reached at step {step}/{cfg.max_steps}: stopping early"
                           f"{unfinished}")
            break
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "time":
            progress = max(progress, elapsed / time_budget_s)
        lr = lr_at(cfg, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        pixels = uint8_to_pixels(images_train[batch_indices(cfg, step)])
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(pixels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        # Clipping guards the no-norm convs against the loss spikes that dead-code restarts can cause.
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        losses.append(float(out.recon_loss))
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(mse=f"{sum(losses[-20:]) / 20:.5f}", lr=f"{lr:.2e}")
        if state_path is not None and step % save_every == 0 and step < cfg.max_steps:
            _save_state(state_path, model, opt, step, elapsed_before + time.perf_counter() - t0, cfg.to_dict())
    bar.close()
    run_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    model.eval()
    done_now = step - start_step
    return {
        "steps": step,
        "train_s": round(elapsed_before + run_s, 1),
        "images_per_s": round(done_now * cfg.batch_size / max(run_s, 1e-9), 1),
        "s_per_step": round(run_s / max(done_now, 1), 4),
        # CPU seconds per step (all threads): on a shared machine this is the load-independent figure.
        "cpu_s_per_step": round(cpu_s / max(done_now, 1), 4),
        "first_mse": round(sum(losses[:10]) / max(1, len(losses[:10])), 6) if losses else None,
        "last_mse": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 6) if losses else None,
        "stopped_by_time_budget": cut,
        "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32",
    }


@torch.no_grad()
def evaluate(model: ShapesVQ, images: torch.Tensor, batch_size: int = 250) -> dict:
    """PSNR (dB, [0, 255] scale, of the uint8 reconstructions) and codebook usage on held-out uint8 images."""
    model.eval()
    psnr, sq_err, counts = [], 0.0, torch.zeros(model.config.codebook_size, dtype=torch.long)
    for start in range(0, images.shape[0], batch_size):
        target = images[start : start + batch_size]
        enc = model.encode(uint8_to_pixels(target))
        recon = pixels_to_uint8(model.decode(enc.codes_BN, enc.grid))
        psnr.append(psnr_uint8(recon, target))
        sq_err += float((recon.float() - target.float()).pow(2).sum())
        counts += torch.bincount(enc.codes_BN.flatten(), minlength=model.config.codebook_size)
    psnr_B = torch.cat(psnr).clamp(max=99.0)
    probs = counts.float() / counts.sum()
    entropy = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
    return {
        "psnr_db": round(float(psnr_B.mean()), 3),
        "psnr_of_mean_mse_db": round(10 * math.log10(255.0**2 / (sq_err / images.numel())), 3),
        "psnr_p05_db": round(float(psnr_B.quantile(0.05)), 3),
        "codes_used": int((counts > 0).sum()),
        "usage_pct": round(100.0 * float((counts > 0).float().mean()), 2),
        "code_perplexity": round(math.exp(entropy), 1),
        "num_eval_images": int(images.shape[0]),
    }


# ---------------------------------------------------------------------------------------------- entry point
def train_vq(
    out_dir: str = "data/shapes/vq",
    num_train: int = 20000,
    num_eval: int = 1000,
    time_budget_s: float = 270.0,
    max_steps: int = TrainVQConfig.max_steps,
    batch_size: int = TrainVQConfig.batch_size,
    lr: float = TrainVQConfig.lr,
    warmup_steps: int = TrainVQConfig.warmup_steps,
    seed: int = 0,
    lr_schedule: str = TrainVQConfig.lr_schedule,
    precision: str = "auto",
    codebook_size: int = ShapesVQConfig.codebook_size,
    code_dim: int = ShapesVQConfig.code_dim,
    channels: tuple[int, ...] = ShapesVQConfig.channels,
    enc_res_blocks: int = ShapesVQConfig.enc_res_blocks,
    dec_res_blocks: int = ShapesVQConfig.dec_res_blocks,
    mid_res_blocks: int = ShapesVQConfig.mid_res_blocks,
    image_size: int = ShapesVQConfig.image_size,
    save_every: int = 200,
    num_threads: int | None = None,
) -> dict:
    """Train a ShapesVQ on the shapes world, evaluate it on held-out images, write the checkpoint and metrics.json.

    Returns the metrics dict. A rerun on an ``out_dir`` with a finished model of the same settings returns its
    metrics without training; other settings on a finished ``out_dir`` raise (pick a new ``out_dir``).
    """
    num_threads = num_threads or pick_num_threads()
    torch.set_num_threads(num_threads)
    cfg = TrainVQConfig(
        num_train=num_train, num_eval=num_eval, seed=seed, batch_size=batch_size, max_steps=max_steps, lr=lr,
        warmup_steps=warmup_steps, lr_schedule=lr_schedule, precision=precision,  # type: ignore[arg-type]
        model=ShapesVQConfig(image_size=image_size, channels=tuple(channels), codebook_size=codebook_size,
                             code_dim=code_dim, enc_res_blocks=enc_res_blocks, dec_res_blocks=dec_res_blocks,
                             mid_res_blocks=mid_res_blocks),
    )
    out = Path(out_dir)
    metrics_path = out / METRICS_NAME
    if metrics_path.exists():
        previous = json.loads(metrics_path.read_text())
        if previous.get("train_config") == cfg.to_dict():
            logger.info(f"{out}: already holds a finished model with these settings; nothing to do "
                        f"(psnr {previous.get('psnr_db')} dB, usage {previous.get('usage_pct')}%)")
            return previous
        raise FileExistsError(f"{metrics_path}: {out} holds a model trained with other settings; "
                              "use another --out_dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    wall_t0 = time.perf_counter()
    world = _world_class()(seed=seed, image_size=image_size)
    images_train = cached_images(out / "cache", world, range(num_train), "train")
    images_eval = cached_images(out / "cache", world, range(EVAL_INDEX_OFFSET, EVAL_INDEX_OFFSET + num_eval), "eval")
    render_s = time.perf_counter() - wall_t0

    torch.manual_seed(seed)
    model = ShapesVQ(cfg.model)
    logger.info(f"ShapesVQ: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, grid {model.grid}, "
                f"{cfg.model.codebook_size} codes of dim {cfg.model.code_dim}; load average {os.getloadavg()}")
    summary = train_loop(model, images_train, cfg, time_budget_s, out / STATE_NAME, save_every)
    metrics = evaluate(model, images_eval)
    model.save_pretrained(out)
    metrics.update(summary)
    metrics.update({
        "render_s": round(render_s, 1),
        "wall_s": round(time.perf_counter() - wall_t0, 1),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "num_threads": num_threads,
        "tokenizer": model.tokenizer_id,
        "train_config": cfg.to_dict(),
    })
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    (out / STATE_NAME).unlink(missing_ok=True)
    logger.info(f"{model.tokenizer_id}: held-out PSNR {metrics['psnr_db']} dB, codebook usage {metrics['usage_pct']}% "
                f"({metrics['codes_used']}/{cfg.model.codebook_size}), {metrics['steps']} steps in "
                f"{metrics['train_s']}s ({metrics['images_per_s']} img/s); wrote {out}")
    return metrics


def main() -> None:
    """CLI entry point: configure the log sink here only, then hand the flags to :func:`train_vq` through fire."""
    import fire

    from uni_arch.log_setup import setup_logging

    setup_logging()
    fire.Fire(train_vq, serialize=lambda out: json.dumps(out, indent=2) if isinstance(out, dict) else out)


if __name__ == "__main__":
    main()
