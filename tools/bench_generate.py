"""Generation benchmark (``python tools/bench.py generate``): the KV cache, batching and the server's batching.

Three tables from one command, on a trained checkpoint (default: the shapes run ``bash train.sh`` leaves):

1. **Cached vs recomputed**: one text-to-image sample with CFG (conditional + unconditional rows in one forward),
   ``evaluation.sampling.ConstrainedDecoder`` with the KV cache against the same decoder with ``use_cache=False``,
   which re-runs the whole sequence every step (what a loop without a cache does). Image tokens/s and the ratio
   (goal: >= 5x at 256 codes). The two paths draw the same codes (same seed), which the command checks.
2. **Batched vs one at a time**: 16 different prompts in one batch (32 rows with their CFG twins) against the same
   16 samples one after the other. Images/s and the ratio.
3. **Server**: ``tools.bench_server.bench_server``: requests/s and image tokens/s of the OpenAI-compatible server
   (continuous batching) with 16 concurrent clients against 1 (goal: >= 4x).

With a CUDA device (``--device cuda``, the default when one is visible) the first two tables are also taken for a
randomly initialised Uni-X at the Qwen2.5-1.5B shape (``configs/model/qwen2.5-1.5b_uni_x_9_5.json``) in bf16,
1,024 codes per image (a 32x32 grid of Chameleon's 8,192 codes), CFG on: random weights draw noise, but the speed of
a step does not depend on the weights.

Method: ``threads`` CPU threads; each case runs ``warmup`` untimed times, then ``repeats`` timed rounds with the
cases interleaved (load spikes on a shared machine hit every case alike); the median is reported. Results are
printed as markdown and written to ``--out`` (json) when given.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from loguru import logger

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES_PROMPTS = [f"a photo of {a} {c} {s}" for c, a in (("red", "a"), ("blue", "a"), ("green", "a"),
                                                           ("orange", "an")) for s in ("circle", "square", "triangle",
                                                                                      "diamond")]


def _timed(cases: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of every case, rounds interleaved."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def decoder_tables(decoder, plans_one: list, plans_batch: list, codes: int, text, image, cfg_scale: float,
                   warmup: int, repeats: int) -> dict[str, Any]:
    """Tables 1 and 2 for any :class:`~evaluation.sampling.ConstrainedDecoder` and rows to draw."""
    def run(plans, use_cache=True):
        return decoder.run(plans, text, image, cfg_scale, codes, use_cache)

    same = run(plans_one) == run(plans_one, use_cache=False)
    t = _timed({"cached": lambda: run(plans_one), "recomputed": lambda: run(plans_one, use_cache=False)},
               warmup, repeats)
    cache = {"codes_per_image": codes, "cached_tokens_per_s": codes / t["cached"],
             "recomputed_tokens_per_s": codes / t["recomputed"], "speedup": t["recomputed"] / t["cached"],
             "same_codes": same}
    t = _timed({"batched": lambda: run(plans_batch),
                "one_at_a_time": lambda: [run([p]) for p in plans_batch]}, warmup, repeats)
    n = len(plans_batch)
    batch = {"images": n, "batched_s": t["batched"], "one_at_a_time_s": t["one_at_a_time"],
             "batched_images_per_s": n / t["batched"], "one_at_a_time_images_per_s": n / t["one_at_a_time"],
             "speedup": t["one_at_a_time"] / t["batched"]}
    return {"cache": cache, "batch": batch}


def checkpoint_tables(checkpoint: str, device: str, cfg_scale: float, warmup: int, repeats: int,
                      grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """Tables 1 and 2 on a trained checkpoint, rows built exactly as ``generate_images`` builds them; ``grid``
    (default: the checkpoint's) sets how many codes each image takes."""
    from evaluation.sampling import IMAGE_DEFAULTS, TEXT_DEFAULTS
    from evaluation.uni_infer import UniInfer

    infer = UniInfer.from_checkpoint(checkpoint, device=device)
    grid = infer.pipe.resolve_grid(grid)
    codes = len(infer.pipe.levels(grid))
    one = infer.t2i_plans(SHAPES_PROMPTS[:1], 1, seed=0, grid=grid, cfg_scale=cfg_scale)
    batch = infer.t2i_plans(SHAPES_PROMPTS, 1, seed=0, grid=grid, cfg_scale=cfg_scale)
    out = decoder_tables(infer.decoder(grid), one, batch, codes, TEXT_DEFAULTS, IMAGE_DEFAULTS, cfg_scale,
                         warmup, repeats)
    out["model"] = {"checkpoint": str(Path(checkpoint).resolve()), "grid": list(grid), "device": device,
                    "parameters_M": sum(p.numel() for p in infer.pipe.model.parameters()) / 1e6}
    return out


def qwen_shape_tables(config_path: str, device: str, cfg_scale: float, warmup: int, repeats: int,
                      grid: tuple[int, int] = (32, 32), prompt_len: int = 32, batch: int = 16) -> dict[str, Any]:
    """Tables 1 and 2 for a randomly initialised Uni-X of a full-size config (bf16 on ``device``)."""
    import torch

    from evaluation.sampling import IMAGE_DEFAULTS, TEXT_DEFAULTS, ConstrainedDecoder, RowPlan
    from modeling.configuration_uni_x import UniXConfig
    from modeling.modeling_uni_x import UniXForCausalLM
    from modeling.vocab import CodeVocab

    raw = {k: v for k, v in json.loads(Path(config_path).read_text()).items() if not k.startswith("_")}
    config = UniXConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    vocab = CodeVocab(config.image_offset, tuple(config.image_level_sizes), config.vision_start_token_id,
                      config.vision_end_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = UniXForCausalLM(config).to(torch.bfloat16).eval()
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)

    def prompt(i):  # random text ids, then <|vision_start|>: the row starts in image mode as text-to-image does
        return torch.randint(1000, 100_000, (prompt_len,), generator=g).tolist() + [vocab.vision_start_id]

    uncond = [1000, vocab.vision_start_id]
    plans = [RowPlan(prompt(i), i, start_in_image=True, stop_after_image=True, uncond_prompt=uncond)
             for i in range(batch)]
    decoder = ConstrainedDecoder(model, vocab, [0] * n, [], [config.eos_token_id or 0])
    out = decoder_tables(decoder, plans[:1], plans, n, TEXT_DEFAULTS, IMAGE_DEFAULTS, cfg_scale, warmup, repeats)
    out["model"] = {"config": config_path, "grid": list(grid), "device": device, "dtype": "bfloat16",
                    "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6}
    return out


def format_tables(results: dict[str, Any]) -> str:
    lines = []
    for name, r in results.items():
        if name == "server" or not isinstance(r, dict) or "cache" not in r:
            continue
        c, b = r["cache"], r["batch"]
        lines += [f"### {name} ({r['model']})", "",
                  "| case | image tokens/s | ratio |", "|---|---|---|",
                  f"| KV cache, CFG, {c['codes_per_image']} codes | {c['cached_tokens_per_s']:.0f} | "
                  f"{c['speedup']:.1f}x |",
                  f"| recompute every step | {c['recomputed_tokens_per_s']:.0f} | 1.0x |", "",
                  "| case | images/s | seconds | ratio |", "|---|---|---|---|",
                  f"| {b['images']} prompts batched | {b['batched_images_per_s']:.2f} | {b['batched_s']:.1f} | "
                  f"{b['speedup']:.1f}x |",
                  f"| {b['images']} one at a time | {b['one_at_a_time_images_per_s']:.2f} | {b['one_at_a_time_s']:.1f} | "
                  "1.0x |", ""]
    server = results.get("server")
    if isinstance(server, dict):
        lines += ["### server (continuous batching)", "", "```", json.dumps(server, indent=2), "```"]
    return "\n".join(lines)


def main(checkpoint: str = "outputs/shapes-tiny-uni-x", threads: int = 2, device: str | None = None,
         cfg_scale: float = 4.0, warmup: int = 1, repeats: int = 3, server: bool = True,
         qwen_config: str = "configs/model/qwen2.5-1.5b_uni_x_9_5.json", out: str | None = None,
         grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run the tables of the module docstring; ``server=False`` skips the server table. ``grid`` (e.g. ``16,16``)
    times images of that many codes instead of the checkpoint's own grid: the shapes default draws 8x8 = 64 codes,
    and the issue's cache goal is stated at 256. Off its grid the model draws nothing meaningful, but the cost of a
    decoding step does not depend on what is drawn."""
    import torch

    from modeling.threads import torch_threads

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(checkpoint).is_dir():
        raise SystemExit(f"{checkpoint}: no checkpoint there; `bash train.sh` makes the default one")
    results: dict[str, Any] = {"threads": threads}
    with torch_threads(threads):
        results["shapes"] = checkpoint_tables(checkpoint, device, cfg_scale, warmup, repeats, grid)
        if device.startswith("cuda"):
            results["qwen2.5-1.5b shape"] = qwen_shape_tables(qwen_config, device, cfg_scale, warmup, repeats)
        else:
            logger.info("no CUDA device: the Qwen2.5-1.5B-shape table needs one (--device cuda)")
    if server:
        from tools.bench_server import bench_server

        results["server"] = bench_server(checkpoint)
    print(format_tables(results))
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results
