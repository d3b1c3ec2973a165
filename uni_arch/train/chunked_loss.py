"""Token cross-entropy of ``hidden @ weight.T`` that never holds ``[tokens, vocab]`` logits for the whole row.

Why: the plain loss projects the whole packed row onto the vocabulary at once. At the reference's scale (rows of
20,480 tokens, 160,128 ids) that is 13 GB of float32 logits per micro-step, and the backward holds about three such
tensors (log-softmax output, its gradient and the logits' gradient). Here the row is cut into chunks of
``chunk_size`` tokens, and each chunk's logits live only while that chunk is processed.

How (the fused linear cross-entropy of Liger-Kernel): the optimised quantity is a weighted SUM of per-token losses
whose weights are known in the forward (1 for a target, 0 for ``IGNORE_INDEX``), so d(loss)/d(logits) of a chunk is
``weight_n * (softmax - onehot)``, known as soon as the chunk's logits are. The forward therefore computes each
chunk's logits, its losses and at once its contribution to ``d hidden`` ([chunk, hidden]) and ``d weight``
(accumulated in float32, [vocab, hidden]), and drops the logits; the backward only multiplies the stored gradients by
the incoming scalar. Recomputing each chunk's logits in the backward instead (``torch.utils.checkpoint`` per chunk)
costs one more ``[chunk, hidden] x [hidden, vocab]`` product per chunk, about a third more work on this layer.
Measured (``python tools/bench.py loss --threads 1``: row 8,192, vocab 160,128, hidden 256, chunks of 1,024, one
CPU thread): peak memory +15,002 MiB plain, +793 MiB here (18.9x less), +2,050 MiB with per-chunk checkpoints; CPU
time 34.5 s plain, 23.2 s here (0.67x: no row-sized buffers to fault in), 46.2 s with checkpoints (1.34x).

Limits, by design: only the weighted sum is differentiable (the per-token losses come back detached, for metrics);
a second backward through the same graph is refused (the stored gradients are scaled in place); the projection
weight must be whole on this rank (DeepSpeed ZeRO-3 and FSDP shard it outside the module's forward: an error says
so). On CUDA with ``liger-kernel`` importable, its Triton kernel computes the differentiable sum instead
(:func:`liger_fused_linear_ce`, detected at run time like flash-attn); the per-modality metric split is then
computed here without gradients on the image targets only.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
from loguru import logger


def chunk_cross_entropy(logits_CV: torch.Tensor, targets_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on ``logits_CV`` (float32): returns (per-token CE [C], ``logits_CV`` now holding the softmax).

    Written out instead of ``F.cross_entropy`` so that one [C, V] buffer serves logits, exp and softmax: the
    chunk's memory is that one buffer.
    """
    logits_CV.sub_(logits_CV.amax(dim=-1, keepdim=True))  # stable: max logit of every row is 0
    target_logit_C = logits_CV.gather(1, targets_C[:, None]).squeeze(1)
    probs_CV = logits_CV.exp_()
    total_C1 = probs_CV.sum(dim=-1, keepdim=True)
    ce_C = total_C1.squeeze(1).log() - target_logit_C  # log-sum-exp - target logit (both shifted by the max)
    return ce_C, probs_CV.div_(total_C1)


def _chunked_pass(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                  token_weight_N: torch.Tensor, chunk_size: int, grad_hidden: bool, grad_weight: bool):
    """One pass over the chunks: per-token CE [N] (float32) and, if asked, d(sum_n w_n ce_n)/d hidden and /d weight."""
    n_tokens = hidden_ND.shape[0]
    ce_N = torch.empty(n_tokens, dtype=torch.float32, device=hidden_ND.device)
    g_hidden_ND = torch.empty_like(hidden_ND) if grad_hidden else None
    # float32 accumulator whatever the weight's dtype: bf16 sums over many chunks would lose the small ones.
    g_weight_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if grad_weight else None
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        hidden_CD = hidden_ND[start:end]
        # The logits in the weight's dtype then float32: exactly the plain path's lm_head(hidden).float().
        logits_CV = (hidden_CD @ weight_VD.T).float()
        ce_N[start:end], probs_CV = chunk_cross_entropy(logits_CV, targets_N[start:end])
        if not (grad_hidden or grad_weight):
            continue
        rows_C = torch.arange(end - start, device=probs_CV.device)
        probs_CV[rows_C, targets_N[start:end]] -= 1.0  # softmax - onehot = d ce / d logits
        grad_CV = probs_CV.mul_(token_weight_N[start:end, None]).to(weight_VD.dtype)
        if g_hidden_ND is not None:
            torch.mm(grad_CV, weight_VD, out=g_hidden_ND[start:end])
        if g_weight_VD is not None:
            if grad_CV.dtype == torch.float32:
                g_weight_VD.addmm_(grad_CV.T, hidden_CD)
            else:
                g_weight_VD.add_(grad_CV.T @ hidden_CD)
        del logits_CV, probs_CV, grad_CV
    if g_weight_VD is not None and g_weight_VD.dtype != weight_VD.dtype:
        g_weight_VD = g_weight_VD.to(weight_VD.dtype)
    return ce_N, g_hidden_ND, g_weight_VD


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(sum_n w_n ce_n, ce_N detached); the gradients are computed in the forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, token_weight_N, chunk_size):
        ce_N, g_hidden, g_weight = _chunked_pass(hidden_ND, weight_VD, targets_N, token_weight_N, chunk_size,
                                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = [g_hidden, g_weight]
        ctx.mark_non_differentiable(ce_N)
        return (ce_N * token_weight_N).sum(), ce_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the chunked cross-entropy stores its gradients once and scales them in place: a "
                               "second backward through the same graph (retain_graph=True) is not supported")
        grads, ctx.grads = ctx.grads, None
        # in place: the stored [vocab, hidden] gradient is not duplicated (once_differentiable: no graph to keep)
        g_hidden, g_weight = (g.mul_(grad_loss) if g is not None else None for g in grads)
        return g_hidden, g_weight, None, None, None


def _check_shapes(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                  token_weight_N: torch.Tensor, chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    if weight_VD.dim() != 2 or weight_VD.shape[1] != hidden_ND.shape[-1] or weight_VD.shape[0] == 0:
        # DeepSpeed ZeRO-3 and FSDP leave a parameter empty or flat outside its module's forward.
        raise ValueError(
            f"the output projection weight has shape {tuple(weight_VD.shape)}, not [vocab, {hidden_ND.shape[-1]}]: "
            "it is partitioned on this rank (DeepSpeed ZeRO-3 or FSDP?); the chunked loss needs the whole weight, "
            "so train with loss_chunk_size=0 or ZeRO-2/DDP"
        )
    if hidden_ND.dim() != 2 or targets_N.shape != hidden_ND.shape[:1] or token_weight_N.shape != targets_N.shape:
        raise ValueError(f"hidden {tuple(hidden_ND.shape)}, targets {tuple(targets_N.shape)} and token weights "
                         f"{tuple(token_weight_N.shape)} must be [N, D], [N] and [N]")


def linear_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         token_weight_N: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_n token_weight_n * CE(hidden_n @ weight.T, target_n), CE_N)``, ``chunk_size`` tokens at a time.

    ``targets_N`` must be valid ids (give ignored positions any id and weight 0); ``token_weight_N`` is float.
    The sum (float32, 0-dim) is differentiable w.r.t. ``hidden_ND`` and ``weight_VD``; ``CE_N`` (float32) is not.
    Equal to ``(F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none") * w).sum()`` and its
    gradients to float rounding (tests/test_chunked_loss.py).
    """
    _check_shapes(hidden_ND, weight_VD, targets_N, token_weight_N, chunk_size)
    token_weight_N = token_weight_N.float()
    needs_grad = torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad)
    if not needs_grad:  # evaluation: the losses only, no gradient buffers
        ce_N, _, _ = _chunked_pass(hidden_ND, weight_VD, targets_N, token_weight_N, chunk_size, False, False)
        return (ce_N * token_weight_N).sum(), ce_N
    return _ChunkedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, token_weight_N, chunk_size)


def liger_fused_linear_ce(device: torch.device) -> Callable | None:
    """Liger-Kernel's fused linear cross-entropy (``liger_kernel.transformers.functional``) when it can serve
    tensors on ``device``: CUDA and the package importable; None otherwise (then this module's own path serves)."""
    if device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:  # installed but broken (no triton, wrong torch): say so once, use our own path
        logger.warning(f"liger-kernel is installed but does not import ({e}); using the chunked torch loss")
        return None
    return liger_fused_linear_cross_entropy
