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

Continuous batching: :class:`DecodeBatch` is the running batch (rows, their twins, the KV cache, the mask and each
row's pending logits). ``add`` prefills new rows in one forward of their own and merges them in: the side with the
shorter cache is left-padded along the sequence axis (zero mask columns, so positions and attention are unchanged)
and the two are concatenated along the batch axis. ``step`` picks one token for every row and runs one forward for
all of them. Finished or cancelled rows leave with ``remove`` (the kept batch indices are selected in the cache and
the mask, and the columns no row attends any more are trimmed on the left). Settings (sampling, CFG scale, budget)
are per row, so requests with different settings share forwards. :meth:`ConstrainedDecoder.run` is "add every row,
step until none is left": the same code path the server's scheduler (``evaluation.scheduler``) drives.

The cache is used throughout: the prompt is encoded once, then one token per row per step. ``use_cache=False``
recomputes the whole sequence every step: the reference the tests compare with and what ``bench.py`` times against.

Randomness is per row: each row owns a ``torch.Generator`` seeded by the caller (seed per sample, not per batch), and
draws exactly once per sampled token, so a sample is the same alone, in any batch, or while other rows join and leave
(tested to 1e-5 on the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.cache_utils import DynamicLayer
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


# DESIGN.md section 6: the reference's text-to-image settings (CFG 4.0 is the caller's default, not a sampling one),
# for Chameleon's VQGAN on natural images; evaluation/exp.py sets them per experiment.
REFERENCE_IMAGE_SAMPLING = SamplingSettings(temperature=0.99, top_k_fraction=0.5, top_p=0.96)
# The default draws from the model's distribution unchanged. Why not the reference's truncation: with a tokenizer that
# encodes empty background with one code (the shapes VQ), "an object starts here" is a rare code at every background
# position, and top-p 0.96 cuts exactly those: measured on a shapes checkpoint (8 seeds x 40 prompts), top-p 0.96 left
# 90% of the images empty (one object in 10%), full sampling drew objects in all (one object in 35%).
# Temperature 0.7 (no truncation, so rare "object starts here" codes keep their chance). In raster order the
# temperature sets how often an object is started at all: too low and the background code wins every position (empty
# images), too high and a second object follows the first. Which way a checkpoint leans varies from run to run, so
# it was chosen over the default recipe's runs (1,600 steps; CFG 4, 40 single-object prompts, 16 seeds each; exact
# rate on three runs): T 0.7 46.7 / 60.3 / 51.1% (mean 52.7), T 0.85 54.8 / 53.1 / 41.6% (49.8), T 1.0 51.6 / 40.5 /
# 30.8% (41.0). The older recipe (800 steps of 2 rows) drew more empty images and preferred 0.85 (43-47% on three
# runs; 34.5% at 0.7 on the one measured); CFG 2.5 or 6 at T 1.0 was worse than CFG 4 on all three.
IMAGE_DEFAULTS = SamplingSettings(temperature=0.7)
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
    ignore_eos: bool = False  # a stop id does not end the row (fixed-length replies for benchmarks and tests)


@dataclass(frozen=True)
class DecodeSettings:
    """How a group of rows (one request) is decoded; rows with different settings share a batch."""

    text: SamplingSettings = TEXT_DEFAULTS
    image: SamplingSettings = IMAGE_DEFAULTS
    cfg_scale: float = 1.0  # applied in image mode to rows with a twin (with s = 1 the formula gives cond: tested)
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclass(eq=False)
class DecodeRow:
    """A conditional row in a :class:`DecodeBatch`: its state machine, its output and (optionally) its logits.

    ``finish`` is None while the row decodes, then ``"stop"`` (a stop id, or the image of a text-to-image row is
    complete), ``"length"`` (out of ``max_new_tokens`` in text mode), ``"cancelled"`` (removed by the caller) or
    ``"error"`` (sampling it raised: ``error``).
    """

    plan: RowPlan
    settings: DecodeSettings
    generator: torch.Generator
    keep_logits: bool = False
    mode: int = TEXT
    pos: int = 0  # next code position in image mode
    steps: int = 0  # tokens chosen so far (sampled or forced): the budget counter
    forced: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # guided, constrained scores of every sampled step
    finish: str | None = None
    error: BaseException | None = None  # why the row ended with finish="error"

    @property
    def has_twin(self) -> bool:
        return self.plan.uncond_prompt is not None


# ------------------------------------------------------------------------------------- cache surgery
def _cache_layers(cache) -> list[DynamicLayer]:
    """The cache's layers, refusing any that cannot be padded/selected as plain [B, H, T, D] tensors."""
    layers = list(cache.layers)
    for layer in layers:
        # sliding-window, static or quantised layers keep other state (offsets, fixed lengths): not supported here
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise TypeError(f"continuous batching needs a DynamicCache of initialised DynamicLayers, got "
                            f"{type(layer).__name__} (initialised={getattr(layer, 'is_initialized', None)})")
    return layers


def _left_pad(t: torch.Tensor, n: int, dim: int, value: float = 0) -> torch.Tensor:
    """``n`` columns of ``value`` before ``t`` along ``dim``."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_full(shape, value), t], dim=dim)


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
        self.device = next(model.parameters()).device
        vocab_size = model.config.vocab_size
        ids_V = torch.arange(vocab_size, device=self.device)
        text_V = ids_V < code_vocab.image_offset  # every id at or above it (codes, tags, padding rows) is banned
        text_V[code_vocab.vision_end_id] = False
        self._text_no_draw_V = text_V.clone()
        self._text_no_draw_V[code_vocab.vision_start_id] = False
        self._text_draw_V = text_V
        self._level_LV = torch.stack([(ids_V >= lo) & (ids_V < hi) for lo, hi in
                                      (code_vocab.level_range(lv) for lv in range(len(code_vocab.level_sizes)))])

    # ---------------------------------------------------------------------------------------- public
    def new_batch(self, use_cache: bool = True) -> "DecodeBatch":
        """An empty running batch on this decoder's model and constraints."""
        return DecodeBatch(self, use_cache)

    def check(self, plans: Sequence[RowPlan], settings: DecodeSettings) -> None:
        """Refuse rows that cannot be decoded (before any forward): a prompt plus the budget longer than the
        model's context, CFG without a twin, an empty prompt."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        block = len(self.size_tag) + len(self.levels) + 1
        for i, p in enumerate(plans):
            if not p.prompt or (p.uncond_prompt is not None and not p.uncond_prompt):
                raise ValueError(f"row {i}: empty prompt")
            if settings.cfg_scale != 1.0 and p.uncond_prompt is None:
                raise ValueError(f"cfg_scale={settings.cfg_scale} needs an uncond_prompt on every row (row {i} has "
                                 f"none)")
            n = max(len(p.prompt), len(p.uncond_prompt or []))
            # an image started at the last step is still finished: the budget grows by at most one image block
            longest = n + settings.max_new_tokens + block * p.allow_draw
            if context is not None and longest > context:
                raise ValueError(f"a prompt of {n} tokens plus up to {longest - n} new tokens exceeds the model's "
                                 f"context of {context} tokens (max_position_embeddings): shorten the conversation "
                                 f"or max_new_tokens")

    @torch.no_grad()
    def run(self, plans: Sequence[RowPlan], text: SamplingSettings, image: SamplingSettings, cfg_scale: float = 1.0,
            max_new_tokens: int = 256, use_cache: bool = True, return_logits: bool = False):
        """Decode every plan; returns the generated ids per row (and, with ``return_logits``, the guided logits of
        every sampled step per row, for tests). Add every row, step until none is left."""
        if not plans:
            raise ValueError("no rows to decode")
        batch = self.new_batch(use_cache)
        rows = batch.add(plans, DecodeSettings(text, image, cfg_scale, max_new_tokens), keep_logits=return_logits)
        while batch.rows:
            for r in batch.step():
                if r.error is not None:
                    raise r.error
        outs = [r.out for r in rows]
        return (outs, [r.logits for r in rows]) if return_logits else outs

    # ------------------------------------------------------------------------------------- per row
    def allowed(self, r: DecodeRow) -> torch.Tensor:
        if r.mode == IMAGE:
            return self._level_LV[self.levels[r.pos]]
        return self._text_draw_V if r.plan.allow_draw else self._text_no_draw_V

    def sample(self, scores_NV: torch.Tensor, allowed_NV: torch.Tensor, s: SamplingSettings,
               rows: list[DecodeRow]) -> list[int]:
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

    def advance(self, r: DecodeRow, tok: int) -> None:
        """Record ``tok`` and move the row's state machine."""
        r.out.append(tok)
        r.steps += 1
        if r.mode == IMAGE and self.vocab.is_image_id(tok):
            r.pos += 1
            if r.pos == len(self.levels):
                r.pos = 0
                if r.plan.stop_after_image:
                    r.mode, r.finish = DONE, "stop"
                else:
                    r.mode = TEXT
                    r.forced = [self.vocab.vision_end_id]
        elif r.mode == TEXT and not r.forced and tok == self.vocab.vision_start_id:
            r.mode, r.pos = IMAGE, 0
            r.forced = list(self.size_tag)
        elif r.mode == TEXT and not r.forced and tok in self.stop_ids and not r.plan.ignore_eos:
            r.mode, r.finish = DONE, "stop"


class DecodeBatch:
    """The running batch of a :class:`ConstrainedDecoder`: rows join (``add``), decode together (``step``) and leave
    (``remove``, or by finishing) at any step; see the module docstring.

    Batch layout: ``slots`` lists, per batch index, the row it belongs to and whether it is that row's CFG twin.
    ``mask_BL`` (and ``ids_BL``, kept only without the cache) are left-padded; ``logits_BV`` are every slot's
    pending next-token logits.
    """

    def __init__(self, decoder: ConstrainedDecoder, use_cache: bool = True):
        self.decoder, self.use_cache = decoder, use_cache
        self.rows: list[DecodeRow] = []
        self.slots: list[tuple[DecodeRow, bool]] = []
        self.cache = None
        self.mask_BL = self.ids_BL = self.logits_BV = None

    def __len__(self) -> int:
        """Batch rows in use, CFG twins included (what a scheduler's ``max_batch_rows`` counts)."""
        return len(self.slots)

    # ------------------------------------------------------------------------------------- join
    @torch.no_grad()
    def add(self, plans: Sequence[RowPlan], settings: DecodeSettings | Sequence[DecodeSettings],
            keep_logits: bool = False) -> list[DecodeRow]:
        """Prefill ``plans`` (one forward for all of them) and merge them into the batch; returns their rows, whose
        ``out`` grows with every ``step``. ``settings``: one for all plans or one per plan."""
        if not plans:
            return []
        per_plan = [settings] * len(plans) if isinstance(settings, DecodeSettings) else list(settings)
        if len(per_plan) != len(plans):
            raise ValueError(f"got {len(per_plan)} settings for {len(plans)} plans")
        for p, s in zip(plans, per_plan):
            self.decoder.check([p], s)
        dec = self.decoder
        rows = [DecodeRow(p, s, torch.Generator(device=dec.device).manual_seed(int(p.seed)), keep_logits,
                          mode=IMAGE if p.start_in_image else TEXT) for p, s in zip(plans, per_plan)]
        slots = [(r, twin) for r in rows for twin in ((False, True) if r.has_twin else (False,))]
        prompts = [r.plan.uncond_prompt if twin else r.plan.prompt for r, twin in slots]
        L = max(len(p) for p in prompts)
        ids_NL = torch.full((len(prompts), L), dec.pad_id, dtype=torch.long)
        mask_NL = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L - 1
            ids_NL[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_NL[i, L - len(p):] = 1
        ids_NL, mask_NL = ids_NL.to(dec.device), mask_NL.to(dec.device)
        # logits_to_keep=1: only the last position's logits (a 160k-row head over a long prompt is GBs otherwise)
        out = dec.model(input_ids=ids_NL, attention_mask=mask_NL, use_cache=self.use_cache, logits_to_keep=1)
        self._merge(slots, out.past_key_values if self.use_cache else None, mask_NL, ids_NL, out.logits[:, -1].float())
        self.rows += rows
        return rows

    def _merge(self, slots, cache, mask_NL, ids_NL, logits_NV) -> None:
        """Append prefilled slots: left-pad whichever side is shorter so all rows end at the same column, then
        concatenate along the batch axis (cache keys/values [B, H, T, D], mask and ids [B, T], logits [B, V])."""
        if not self.slots:
            self.slots, self.cache, self.mask_BL, self.logits_BV = slots, cache, mask_NL, logits_NV
            self.ids_BL = None if self.use_cache else ids_NL
            return
        old_len, new_len = self.mask_BL.shape[1], mask_NL.shape[1]
        pad_old, pad_new = max(0, new_len - old_len), max(0, old_len - new_len)
        if self.use_cache:
            for old, new in zip(_cache_layers(self.cache), _cache_layers(cache), strict=True):
                old.keys = torch.cat([_left_pad(old.keys, pad_old, -2), _left_pad(new.keys, pad_new, -2)], dim=0)
                old.values = torch.cat([_left_pad(old.values, pad_old, -2), _left_pad(new.values, pad_new, -2)], 0)
        else:
            self.ids_BL = torch.cat([_left_pad(self.ids_BL, pad_old, 1, self.decoder.pad_id),
                                     _left_pad(ids_NL, pad_new, 1, self.decoder.pad_id)])
        self.mask_BL = torch.cat([_left_pad(self.mask_BL, pad_old, 1), _left_pad(mask_NL, pad_new, 1)])
        self.logits_BV = torch.cat([self.logits_BV, logits_NV])
        self.slots += slots

    # ------------------------------------------------------------------------------------- leave
    def remove(self, rows: Sequence[DecodeRow], finish: str = "cancelled") -> None:
        """Take ``rows`` (and their twins) out of the batch; rows still decoding get ``finish``."""
        gone = set(id(r) for r in rows)
        for r in rows:
            if r.finish is None:
                r.mode, r.finish = DONE, finish
        if not gone & set(id(r) for r in self.rows):
            return
        self.rows = [r for r in self.rows if id(r) not in gone]
        keep = [b for b, (r, _) in enumerate(self.slots) if id(r) not in gone]
        self.slots = [self.slots[b] for b in keep]
        if not keep:
            self.cache = self.mask_BL = self.ids_BL = self.logits_BV = None
            return
        keep_K = torch.tensor(keep, dtype=torch.long, device=self.mask_BL.device)
        mask_KL = self.mask_BL.index_select(0, keep_K)
        first = int(mask_KL.any(0).long().argmax())  # columns before it are padding for every kept row
        self.mask_BL = mask_KL[:, first:]
        self.logits_BV = self.logits_BV.index_select(0, keep_K)
        if self.use_cache:
            for layer in _cache_layers(self.cache):
                layer.keys = layer.keys.index_select(0, keep_K)[:, :, first:]
                layer.values = layer.values.index_select(0, keep_K)[:, :, first:]
        else:
            self.ids_BL = self.ids_BL.index_select(0, keep_K)[:, first:]

    # -------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> list[DecodeRow]:
        """One token for every row (forced or sampled), then one forward for the rows still decoding; returns the
        rows that finished in this step (already removed from the batch)."""
        if not self.rows:
            return []
        for r in self.rows:  # out of budget: rows in text stop, an image being drawn is completed
            if r.steps >= r.settings.max_new_tokens and r.mode == TEXT and not r.forced:
                r.mode, r.finish = DONE, "length"
        chosen = self._choose()
        finished = [r for r in self.rows if r.mode == DONE]
        self.remove(finished)
        if self.rows:
            self._forward([chosen[id(r)] for r, _ in self.slots])
        return finished

    def _choose(self) -> dict[int, int]:
        """The next token of every row still decoding (by ``id(row)``): forced, or sampled under its mode's
        constraints and its own settings, with CFG on the rows in image mode that have a twin."""
        dec = self.decoder
        index = {(id(r), twin): b for b, (r, twin) in enumerate(self.slots)}
        cond_RV = self.logits_BV.index_select(0, torch.tensor([index[id(r), False] for r in self.rows],
                                                               device=self.logits_BV.device))
        guided = [i for i, r in enumerate(self.rows) if r.has_twin and r.mode == IMAGE]
        if guided:
            g_G = torch.tensor(guided, device=cond_RV.device)
            uncond_GV = self.logits_BV[[index[id(self.rows[i]), True] for i in guided]]
            s_G1 = torch.tensor([self.rows[i].settings.cfg_scale for i in guided], device=cond_RV.device)[:, None]
            cond_GV = cond_RV.index_select(0, g_G)
            cond_RV[g_G] = uncond_GV + s_G1 * (cond_GV - uncond_GV)
        chosen: dict[int, int] = {}
        groups: dict[tuple[int, SamplingSettings], list[int]] = {}
        for i, r in enumerate(self.rows):
            if r.mode == DONE:
                continue
            if r.forced:
                chosen[id(r)] = r.forced.pop(0)
            else:
                s = r.settings.image if r.mode == IMAGE else r.settings.text
                groups.setdefault((r.mode, s), []).append(i)
        for (_, settings), idx in groups.items():
            rows = [self.rows[i] for i in idx]
            allowed_NV = torch.stack([dec.allowed(r) for r in rows])
            scores_NV = cond_RV[idx].masked_fill(~allowed_NV, float("-inf"))
            for n, r in enumerate(rows):
                if r.keep_logits:
                    r.logits.append(scores_NV[n].cpu())
            for r, tok in zip(rows, self._sample_isolated(scores_NV, allowed_NV, settings, rows)):
                if tok is not None:
                    chosen[id(r)] = tok
        for r in self.rows:
            if id(r) in chosen:
                dec.advance(r, chosen[id(r)])
        return chosen

    def _sample_isolated(self, scores_NV, allowed_NV, settings: SamplingSettings,
                         rows: list[DecodeRow]) -> list[int | None]:
        """``decoder.sample`` for a group; when it raises (bad logits or settings of one request), each row is
        sampled alone from its generator's state before the attempt, and only the rows that still fail end with
        ``finish="error"`` (``row.error``), so one request's failure never ends the others'."""
        states = [r.generator.get_state() for r in rows]
        try:
            return self.decoder.sample(scores_NV, allowed_NV, settings, rows)
        except Exception:  # noqa: BLE001 - isolated per row below
            picks: list[int | None] = []
            for n, (r, state) in enumerate(zip(rows, states)):
                r.generator.set_state(state)
                try:
                    picks += self.decoder.sample(scores_NV[n:n + 1], allowed_NV[n:n + 1], settings, [r])
                except Exception as e:  # noqa: BLE001 - reported on the row, raised by run()
                    r.mode, r.finish, r.error = DONE, "error", e
                    picks.append(None)
            return picks

    def _forward(self, next_B: list[int]) -> None:
        """Feed every slot its next token (twins: the row's vision tokens, else an ignored pad) and keep the logits."""
        dec, vocab = self.decoder, self.decoder.vocab
        feed, cols = [], []
        for b, ((r, twin), t) in enumerate(zip(self.slots, next_B)):
            follows = not twin or bool(vocab.is_vision_id(t))
            feed.append(t if follows else dec.pad_id)
            cols.append(1 if follows else 0)
            if twin and t == vocab.vision_end_id:  # the image is closed: the twin forgets it
                real_L = self.mask_BL[b].nonzero()[:, 0]
                self.mask_BL[b, int(real_L[len(r.plan.uncond_prompt) - 1]) + 1:] = 0
        feed_B = torch.tensor(feed, dtype=torch.long, device=self.mask_BL.device)
        self.mask_BL = torch.cat([self.mask_BL, torch.tensor(cols, device=self.mask_BL.device)[:, None]], dim=1)
        if self.use_cache:
            out = dec.model(input_ids=feed_B[:, None], attention_mask=self.mask_BL, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1)
            self.cache = out.past_key_values
        else:
            self.ids_BL = torch.cat([self.ids_BL, feed_B[:, None]], dim=1)
            out = dec.model(input_ids=self.ids_BL, attention_mask=self.mask_BL, use_cache=False, logits_to_keep=1)
        self.logits_BV = out.logits[:, -1].float()
