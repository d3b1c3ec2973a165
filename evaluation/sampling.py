"""Constrained any-modal decoding on the KV cache, with classifier-free guidance batched into the same forward.

One loop serves text replies, text-to-image and 4o-style replies that mix both. Every row is a small state machine:

* **text**: only ids below ``image_offset`` (text and special tokens; never codes, size tags or padding rows of the
  head), never ``<|vision_end|>``; ``<|vision_start|>`` only when the caller lets the model draw. Sampling
  ``<|vision_start|>`` switches the row to image mode (after the forced size tag, when the renderer tags this grid).
  A stop id (``<|im_end|>``, ``<|endoftext|>``) ends the row.
* **image**: at code position ``p`` only ``level_range(levels[p])`` is allowed (HQ-VAE interleaves levels), exactly
  ``len(levels)`` codes; then ``<|vision_end|>`` is forced and the row is back in text mode (or done, for
  text-to-image), so every generated image decodes.
* **forced** tokens (size tags, ``<|vision_end|>``) are fed without sampling and consume no randomness.
* ``max_new_tokens`` ends rows in text mode; an image block already opened is still completed (its codes and
  ``<|vision_end|>``), so a reply never holds half an image.

CFG: each conditional row may have an unconditional twin (``t2i_prompt_ids(None)``) in the same batch, left-padded
with an attention mask, so one forward gives both; in image mode ``logits = uncond + s * (cond - uncond)``. A twin
follows its row only through image blocks: it is fed the row's vision tokens (``<|vision_start|>``, tags, codes);
otherwise it is fed a pad token whose mask column is 0 (ignored by every later query), and when the row closes an
image the twin's columns after its prompt are masked out again, so each image is guided by the bare unconditional
prompt. Positions follow the mask (the model counts real tokens), so masked columns leave no gap. transformers'
``guidance_scale`` would run a second, unbatched forward per step instead.

The cache is used throughout: the prompt is encoded once, then one token per row per step. ``use_cache=False``
recomputes the whole sequence every step: the reference the tests compare with and what ``bench.py`` times against.

Randomness is per row: each row owns a ``torch.Generator`` seeded by the caller (seed per sample, not per batch), and
draws exactly once per sampled token, so a sample is the same alone or in any batch (same seed and settings, same
image).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from modeling.vocab import CodeVocab

TEXT, IMAGE, DONE = 0, 1, 2


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick a token. ``temperature=0`` is greedy; ``top_k`` 0/None = off; ``top_p`` 1.0 = off.

    For images ``top_k_fraction`` scales top-k to the codebook of the position's level (the reference's 4096 of
    8,192 codes is 0.5: 256 of the shapes VQ's 512); an explicit ``top_k`` wins over the fraction.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_k_fraction: float | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.top_k_fraction is not None and not 0.0 < self.top_k_fraction <= 1.0:
            raise ValueError(f"top_k_fraction={self.top_k_fraction} must be in (0, 1]")

    def k_for(self, codebook: int) -> int:
        """Top-k for a vocabulary (or codebook level) of ``codebook`` entries; 0 = no top-k."""
        if self.top_k:
            return int(self.top_k)
        if self.top_k_fraction is not None:
            return max(1, round(self.top_k_fraction * codebook))
        return 0


# DESIGN.md section 6: the reference's text-to-image settings (CFG 4.0 is the caller's default, not a sampling one).
IMAGE_DEFAULTS = SamplingSettings(temperature=0.99, top_k_fraction=0.5, top_p=0.96)
TEXT_DEFAULTS = SamplingSettings(temperature=0.7, top_p=0.9)


@dataclass
class RowPlan:
    """One conditional row: its prompt, what it may do and its seed."""

    prompt: list[int]
    seed: int
    start_in_image: bool = False  # the prompt ends with <|vision_start|> [size tag]: the row draws at once
    allow_draw: bool = False  # text mode may sample <|vision_start|>
    stop_after_image: bool = False  # text-to-image: done after the last code (no <|vision_end|> needed)
    uncond_prompt: list[int] | None = None  # CFG twin's prompt (ends with <|vision_start|> [tag] iff start_in_image)


@dataclass
class _Row:
    plan: RowPlan
    generator: torch.Generator
    mode: int = TEXT
    pos: int = 0  # next code position in image mode
    forced: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)


class ConstrainedDecoder:
    """Batched constrained decoding for one model (see the module docstring).

    Args:
        model: a causal LM taking ``attention_mask`` for left padding and a KV cache (``UniXForCausalLM``).
        code_vocab: the id layout.
        levels: codebook level per code position of the image grid to draw.
        size_tag: ids forced after a ``<|vision_start|>`` the model samples itself (``SampleBuilder.size_tag_ids_for``).
        stop_ids: ids that end a reply.
        pad_id: the id fed in padding / idle columns (any text id: its mask column is 0).
    """

    def __init__(self, model, code_vocab: CodeVocab, levels: Sequence[int], size_tag: Sequence[int],
                 stop_ids: Sequence[int], pad_id: int = 0):
        self.model, self.vocab = model, code_vocab
        self.levels = [int(x) for x in levels]
        self.size_tag, self.stop_ids, self.pad_id = list(size_tag), set(int(i) for i in stop_ids), int(pad_id)
        if not self.levels:
            raise ValueError("levels is empty: an image needs at least one code position")
        vocab_size = model.config.vocab_size
        ids_V = torch.arange(vocab_size, device=next(model.parameters()).device)
        text_V = ids_V < code_vocab.image_offset  # every id at or above it (codes, tags, padding rows) is banned
        text_V[code_vocab.vision_end_id] = False
        self._text_no_draw_V = text_V.clone()
        self._text_no_draw_V[code_vocab.vision_start_id] = False
        self._text_draw_V = text_V
        self._level_LV = torch.stack([(ids_V >= lo) & (ids_V < hi) for lo, hi in
                                      (code_vocab.level_range(lv) for lv in range(len(code_vocab.level_sizes)))])

    # ---------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def run(self, plans: Sequence[RowPlan], text: SamplingSettings, image: SamplingSettings, cfg_scale: float = 1.0,
            max_new_tokens: int = 256, use_cache: bool = True, return_logits: bool = False):
        """Decode every plan; returns the generated ids per row (and, with ``return_logits``, the guided logits of
        every sampled step per row, for tests)."""
        if not plans:
            raise ValueError("no rows to decode")
        device = next(self.model.parameters()).device
        rows = [_Row(p, torch.Generator(device=device).manual_seed(int(p.seed))) for p in plans]
        for r in rows:
            if r.plan.start_in_image:
                r.mode = IMAGE
        twins = [p.uncond_prompt is not None for p in plans]
        if any(twins) and not all(twins):
            raise ValueError("either every row has an uncond_prompt (CFG) or none has")
        use_cfg = all(twins)
        if cfg_scale != 1.0 and not use_cfg:
            raise ValueError(f"cfg_scale={cfg_scale} needs an uncond_prompt on every row")
        prompts = [p.prompt for p in plans] + ([p.uncond_prompt for p in plans] if use_cfg else [])
        L = max(len(p) for p in prompts)
        # an image started at the last step is still finished: the budget grows by at most one image block
        longest = L + max_new_tokens + (len(self.size_tag) + len(self.levels) + 1) * any(p.allow_draw for p in plans)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and longest > context:
            raise ValueError(f"a prompt of {L} tokens plus up to {longest - L} new tokens exceeds the model's context "
                             f"of {context} tokens (max_position_embeddings): shorten the conversation or "
                             f"max_new_tokens")
        ids_BL = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L - 1
            ids_BL[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_BL[i, L - len(p):] = 1
        ids_BL, mask_BL = ids_BL.to(device), mask_BL.to(device)
        logs: list[list[torch.Tensor]] = [[] for _ in rows]

        # logits_to_keep=1: only the last position's logits (a 160k-row head over a long prompt is GBs otherwise)
        out = self.model(input_ids=ids_BL, attention_mask=mask_BL, use_cache=use_cache, logits_to_keep=1)
        cache = out.past_key_values if use_cache else None
        logits = out.logits[:, -1].float()
        for step in itertools.count():
            if step >= max_new_tokens:  # out of budget: rows in text stop, an image being drawn is completed
                for r in rows:
                    if r.mode == TEXT and not r.forced:
                        r.mode = DONE
            next_B = self._choose(rows, logits, text, image, cfg_scale if use_cfg else None, logs, return_logits)
            if all(r.mode == DONE for r in rows):
                break
            feed, cols = self._feed(rows, next_B, use_cfg, mask_BL, L)
            feed, cols = feed.to(device), cols.to(device)
            mask_BL = torch.cat([mask_BL, cols[:, None]], dim=1)
            if use_cache:
                out = self.model(input_ids=feed[:, None], attention_mask=mask_BL, past_key_values=cache,
                                 use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
            else:
                ids_BL = torch.cat([ids_BL, feed[:, None]], dim=1)
                out = self.model(input_ids=ids_BL, attention_mask=mask_BL, use_cache=False, logits_to_keep=1)
            logits = out.logits[:, -1].float()
        outs = [r.out for r in rows]
        return (outs, logs) if return_logits else outs

    # ------------------------------------------------------------------------------------- per step
    def _choose(self, rows: list[_Row], logits_BV: torch.Tensor, text: SamplingSettings, image: SamplingSettings,
                cfg_scale: float | None, logs, keep_logits: bool) -> list[int | None]:
        """The next token of every row: forced, sampled under its mode's constraints, or None (row done)."""
        B = len(rows)
        cond_BV = logits_BV[:B]
        if cfg_scale is not None:  # twins present (with s = 1 the formula gives cond: tested)
            uncond_BV = logits_BV[B:]
            guided_BV = uncond_BV + cfg_scale * (cond_BV - uncond_BV)
            in_image_B = torch.tensor([r.mode == IMAGE for r in rows], device=cond_BV.device)
            cond_BV = torch.where(in_image_B[:, None], guided_BV, cond_BV)
        chosen: list[int | None] = [None] * B
        sampled = {TEXT: [], IMAGE: []}
        for i, r in enumerate(rows):
            if r.mode == DONE:
                continue
            if r.forced:
                chosen[i] = r.forced.pop(0)
            else:
                sampled[r.mode].append(i)
        for mode, idx in sampled.items():
            if not idx:
                continue
            settings = image if mode == IMAGE else text
            scores_NV = cond_BV[idx].clone()
            allowed_NV = torch.stack([self._allowed(rows[i]) for i in idx])
            scores_NV = scores_NV.masked_fill(~allowed_NV, float("-inf"))
            if keep_logits:
                for n, i in enumerate(idx):
                    logs[i].append(scores_NV[n].cpu())
            picks = self._sample(scores_NV, allowed_NV, settings, [rows[i] for i in idx])
            for i, tok in zip(idx, picks):
                chosen[i] = tok
        for i, r in enumerate(rows):
            if chosen[i] is not None:
                self._advance(r, chosen[i])
        return chosen

    def _allowed(self, r: _Row) -> torch.Tensor:
        if r.mode == IMAGE:
            return self._level_LV[self.levels[r.pos]]
        return self._text_draw_V if r.plan.allow_draw else self._text_no_draw_V

    def _sample(self, scores_NV: torch.Tensor, allowed_NV: torch.Tensor, s: SamplingSettings,
                rows: list[_Row]) -> list[int]:
        if s.temperature == 0:
            return scores_NV.argmax(-1).tolist()
        scores_NV = scores_NV / s.temperature
        # top-k per row: k follows the size of what the row may emit (its codebook level, or the text ids)
        k_N = torch.tensor([s.k_for(int(n)) for n in allowed_NV.sum(-1).tolist()], device=scores_NV.device)
        if bool((k_N > 0).any()):
            k_N = torch.where(k_N > 0, k_N, scores_NV.shape[-1]).clamp(max=scores_NV.shape[-1])
            kth_N1 = scores_NV.topk(int(k_N.max()), dim=-1).values.gather(1, (k_N - 1)[:, None])
            scores_NV = scores_NV.masked_fill(scores_NV < kth_N1, float("-inf"))
        if s.top_p < 1.0:
            scores_NV = TopPLogitsWarper(s.top_p)(None, scores_NV)
        probs_NV = torch.softmax(scores_NV, dim=-1)
        return [int(torch.multinomial(probs_NV[n], 1, generator=r.generator)) for n, r in enumerate(rows)]

    def _advance(self, r: _Row, tok: int) -> None:
        """Record ``tok`` and move the row's state machine."""
        r.out.append(tok)
        if r.mode == IMAGE and self.vocab.is_image_id(tok):
            r.pos += 1
            if r.pos == len(self.levels):
                r.pos = 0
                if r.plan.stop_after_image:
                    r.mode = DONE
                else:
                    r.mode = TEXT
                    r.forced = [self.vocab.vision_end_id]
        elif r.mode == TEXT and not r.forced and tok == self.vocab.vision_start_id:
            r.mode, r.pos = IMAGE, 0
            r.forced = list(self.size_tag)
        elif r.mode == TEXT and not r.forced and tok in self.stop_ids:
            r.mode = DONE

    def _feed(self, rows: list[_Row], next_B: list[int | None], use_cfg: bool, mask_BL: torch.Tensor,
              prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The token every batch row is fed next and its mask column (0 = ignored from now on)."""
        B = len(rows)
        feed = [self.pad_id if t is None else t for t in next_B]
        cols = [0 if t is None else 1 for t in next_B]
        if use_cfg:
            for i, t in enumerate(next_B):
                follows = t is not None and bool(self.vocab.is_vision_id(t))
                feed.append(t if follows else self.pad_id)
                cols.append(1 if follows else 0)
                if t == self.vocab.vision_end_id:  # the image is closed: the twin forgets it
                    mask_BL[B + i, prompt_len:] = 0
        return torch.tensor(feed, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
