"""``UniTrainer``: the HF Trainer with per-modality losses, token throughput and a NaN stop -- through hooks only.

What changes, and where:

* ``compute_loss`` -- one forward without labels, then the usual shifted token-level cross entropy computed here so
  that it can be split by the *target's* modality: image loss = targets that are size tags, image codes or
  ``<|vision_end|>`` (the model must learn to close the block), text loss = every other target. The optimised loss
  is exactly the model's own (sum over targets / number of targets of the whole accumulated batch, as the Trainer's
  ``num_items_in_batch`` says), so gradient accumulation and multi-rank averaging behave like the stock Trainer.
  A non-finite loss stops the run at that very step on every rank (one tiny all-reduce per micro-batch), with a
  message naming the step, instead of being averaged away by ``logging_nan_inf_filter``.
  With ``loss_chunk_size > 0`` the forward is called with ``skip_logits=True`` and the same losses come from its
  final hidden states and the output projection's weight, chunk by chunk (``uni_arch.train.chunked_loss``: the
  [tokens, vocab] logits of the whole row never exist); 0 (the default) is the plain path above, unchanged.
* ``log`` -- sums buffered since the last log are summed over all ranks (``accelerator.reduce``) and
  added as ``text_loss``, ``image_loss``, ``text_tokens``, ``image_tokens``, ``tokens_per_second`` (real tokens,
  all ranks, wall clock since the last log) and ``token_utilisation`` (real tokens / row capacity).

No model code lives here: the trainer sees logits (or final hidden states and the head's weight) and labels.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger
from transformers import Trainer

from modeling.vocab import IGNORE_INDEX, CodeVocab
from uni_arch.train.chunked_loss import liger_fused_linear_ce, linear_cross_entropy
from uni_arch.train.data_collator import META_KEYS

# Buffer slots, summed over micro-batches and ranks between two logs.
_METRICS = ("text_loss_sum", "text_tokens", "image_loss_sum", "image_tokens", "real_tokens", "capacity_tokens")


def target_is_image(targets: torch.Tensor, vocab: CodeVocab | None) -> torch.Tensor:
    """Mask of targets that count as image tokens (``CodeVocab.is_image_target``: size tags, codes and
    ``<|vision_end|>``, the targets the vision branch predicts); all text without a code vocabulary."""
    if vocab is None:
        return torch.zeros_like(targets, dtype=torch.bool)
    return vocab.is_image_target(targets)


def _shifted_targets(labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of every position (predict t+1 from t), flattened [N], and their mask of real targets."""
    targets_N = labels_BT[:, 1:].reshape(-1)
    return targets_N, targets_N != IGNORE_INDEX


def _parts(loss_sum: torch.Tensor, text_sum: torch.Tensor, image_sum: torch.Tensor, valid_N: torch.Tensor,
           image_N: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss_sum": loss_sum, "num_targets": valid_N.sum(), "text_loss_sum": text_sum,
            "text_tokens": (valid_N & ~image_N).sum(), "image_loss_sum": image_sum, "image_tokens": image_N.sum()}


def modality_losses(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, vocab: CodeVocab | None) -> dict[str, torch.Tensor]:
    """Shifted token CE (float32) split by target modality: sums and counts, all 0-dim tensors."""
    logits_NV = logits_BTV[:, :-1, :].reshape(-1, logits_BTV.shape[-1]).float()  # predict t+1 from t
    targets_N, valid_N = _shifted_targets(labels_BT)
    ce_N = F.cross_entropy(logits_NV, targets_N.clamp_min(0), reduction="none") * valid_N
    image_N = target_is_image(targets_N, vocab) & valid_N
    text_N = valid_N & ~image_N
    return _parts(ce_N.sum(), (ce_N * text_N).sum(), (ce_N * image_N).sum(), valid_N, image_N)


def chunked_modality_losses(hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, labels_BT: torch.Tensor,
                            vocab: CodeVocab | None, chunk_size: int) -> dict[str, torch.Tensor]:
    """:func:`modality_losses` of ``logits = hidden @ weight.T`` without the [tokens, vocab] logits of the whole
    row (``uni_arch.train.chunked_loss``): same values and gradients of ``loss_sum`` to float rounding; the two
    per-modality sums are metrics here, without gradients."""
    hidden_ND = hidden_BTD[:, :-1, :].reshape(-1, hidden_BTD.shape[-1])  # predict t+1 from t
    targets_N, valid_N = _shifted_targets(labels_BT)
    image_N = target_is_image(targets_N, vocab) & valid_N
    text_N = valid_N & ~image_N
    liger = liger_fused_linear_ce(hidden_ND.device)
    if liger is None:
        loss_sum, ce_N = linear_cross_entropy(hidden_ND, weight_VD, targets_N.clamp_min(0), valid_N.float(),
                                              chunk_size)
        ce_N = ce_N * valid_N
        return _parts(loss_sum, (ce_N * text_N).sum(), (ce_N * image_N).sum(), valid_N, image_N)
    # Liger returns the sum only: the image part is recomputed here, forward only, on the image targets' rows.
    loss_sum = liger(hidden_ND, weight_VD, targets_N, ignore_index=IGNORE_INDEX, reduction="sum").float()
    with torch.no_grad():
        image_sum, _ = linear_cross_entropy(hidden_ND[image_N], weight_VD, targets_N[image_N],
                                            torch.ones_like(targets_N[image_N], dtype=torch.float32), chunk_size)
    return _parts(loss_sum, loss_sum.detach() - image_sum, image_sum, valid_N, image_N)


def sharded_head_problem(loss_chunk_size: int, zero_stage: int, fsdp: bool) -> str | None:
    """Why the chunked loss cannot run on this engine, or None: it reads the head's weight outside the head's
    forward, where DeepSpeed ZeRO-3 and FSDP keep only this rank's shard of it."""
    if loss_chunk_size and (zero_stage == 3 or fsdp):
        engine = "DeepSpeed ZeRO-3" if zero_stage == 3 else "FSDP"
        return (f"loss_chunk_size={loss_chunk_size} needs the whole output projection on every rank, and {engine} "
                "shards it: use loss_chunk_size=0 with this engine, or ZeRO-2/DDP")
    return None


class UniTrainer(Trainer):
    """HF Trainer + per-modality metrics (see the module docstring). Extra args: ``code_vocab``, and
    ``inference_spec`` (``uni_arch.train.inference_spec.InferenceSpec``), written into every saved checkpoint."""

    def __init__(self, *args: Any, code_vocab: CodeVocab | None = None, inference_spec=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        chunk = getattr(self.args, "loss_chunk_size", 0)
        zero = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else 0
        problem = sharded_head_problem(chunk, zero, self.is_fsdp_enabled)
        if problem:
            raise ValueError(problem)
        if chunk:
            liger = liger_fused_linear_ce(self.args.device) is not None
            logger.info(f"loss: chunked, {chunk} tokens per chunk ("
                        f"{'liger-kernel' if liger else 'torch; liger-kernel absent or not on CUDA'})")
        self.code_vocab = code_vocab
        self.inference_spec = inference_spec
        self._metric_sums: torch.Tensor | None = None
        self._metric_clock: float | None = None

    # ------------------------------------------------------------------------------------ save
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The stock save (every engine: plain, DDP, FSDP, DeepSpeed incl. ZeRO-3; ``checkpoint-N/`` saves come
        through here too), then ``uni_x_inference.json`` next to the weights, by the process that writes them
        (``should_save``), so every checkpoint says how to render prompts and which image tokenizer to use."""
        super().save_model(output_dir, _internal_call)
        if self.inference_spec is not None and self.args.should_save:
            self.inference_spec.save(output_dir if output_dir is not None else self.args.output_dir)

    # ------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        real = inputs.pop("num_real_tokens", None)
        capacity = inputs.pop("num_capacity_tokens", None)
        for key in META_KEYS:
            inputs.pop(key, None)
        labels = inputs.pop("labels")
        if model.training and self._metric_clock is None:
            self._metric_clock = time.perf_counter()  # first step: start before the forward, so it is timed too
        # use_cache=False: with a cache transformers does not build the packed mask (DESIGN.md section 9).
        chunk = getattr(self.args, "loss_chunk_size", 0)  # stock TrainingArguments: the plain loss
        if chunk:
            # The head is applied chunk by chunk in the loss: the model returns its final hidden states instead.
            outputs = model(**inputs, use_cache=False, skip_logits=True)
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            parts = chunked_modality_losses(outputs.last_hidden_state, head.weight, labels, self.code_vocab, chunk)
        else:
            outputs = model(**inputs, use_cache=False)
            parts = modality_losses(outputs.logits, labels, self.code_vocab)
        if num_items_in_batch is not None:
            # Normalised over the whole accumulated (and, by default, all-rank) batch, like the model's own loss.
            loss = parts["loss_sum"] / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
            self.loss_is_scaled_for_ga = True
        else:
            loss = parts["loss_sum"] / parts["num_targets"].clamp_min(1)
            self.loss_is_scaled_for_ga = False
        if model.training:
            self._check_finite(loss)
            self._buffer(parts, labels, real, capacity)
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")  # every rank stops together, none hangs
        if bool(bad.item()):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {self.state.global_step + 1} (on {int(bad.item())} rank(s)): "
                f"stopping now; lower learning_rate (={self.args.learning_rate}), check max_grad_norm or the data"
            )

    def _buffer(self, parts: dict[str, torch.Tensor], labels: torch.Tensor, real, capacity) -> None:
        n_real = real if real is not None else torch.tensor(labels.numel())
        n_capacity = capacity if capacity is not None else torch.tensor(labels.numel())
        values = [parts[k] for k in _METRICS[:4]] + [n_real, n_capacity]
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=labels.device).detach() for v in values])
        self._metric_sums = row if self._metric_sums is None else self._metric_sums + row

    # ------------------------------------------------------------------------------------- log
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metric_sums is not None and "loss" in logs:
            logs.update(self._drain_metrics())
        super().log(logs, start_time)

    def _drain_metrics(self) -> dict[str, float]:
        """Sum the buffered sums over ranks (a collective: every rank logs at the same steps).

        ``accelerator.reduce``, not ``gather_for_metrics``: at the end of an epoch the latter trims the gathered
        tensor to the dataloader's "remainder" (meant for duplicated eval samples), which would silently drop
        whole ranks' sums here.
        """
        sums = self.accelerator.reduce(self._metric_sums.clone(), reduction="sum").cpu()
        m = dict(zip(_METRICS, sums.tolist()))
        now = time.perf_counter()
        elapsed = max(now - (self._metric_clock or now), 1e-9)
        # The next interval starts now: throughput covers everything between two logs (forward, backward,
        # optimizer step, data loading), not just the part after the forward.
        self._metric_sums, self._metric_clock = None, now
        out = {"text_tokens": m["text_tokens"], "image_tokens": m["image_tokens"], "real_tokens": m["real_tokens"],
               "tokens_per_second": m["real_tokens"] / elapsed,
               "token_utilisation": m["real_tokens"] / max(m["capacity_tokens"], 1.0)}
        if m["text_tokens"]:
            out["text_loss"] = m["text_loss_sum"] / m["text_tokens"]
        if m["image_tokens"]:
            out["image_loss"] = m["image_loss_sum"] / m["image_tokens"]
        return out
