"""``upreid::info_nce``: fused similarity + logsumexp contrastive loss (typed wrapper, fake kernel,
autograd formula)."""
from __future__ import annotations

import torch
from torch import Tensor

import upreid.ops._checks as _checks
import upreid.ops._dispatch as _dispatch
import upreid.ops._lib as _lib
import upreid.ops.reference as reference


def info_nce(
    query: Tensor,
    keys: Tensor,
    positive: Tensor,
    bank: Tensor | None = None,
    temperature: float = 0.1,
    group_size: int = 0,
    impl: str = "fused",
) -> tuple[Tensor, Tensor]:
    """Per-row InfoNCE loss without materialising the logits.

    Row ``i`` contrasts ``query[i] / temperature`` against its positive key ``keys[positive[i]]``,
    the other keys of its group and every row of ``bank``:

    * ``group_size == 0``: all ``N`` keys are candidates (in-batch negatives);
    * ``group_size == 1``: only the positive key (MoCo: negatives come from the bank);
    * ``group_size == P``: keys ``j`` with ``j // P == positive[i] // P`` (the stripes of one image).

    Args:
        query: ``[M, D]`` float tensor (fp32, fp16, bf16 or fp64), receives a gradient.
        keys: ``[N, D]``, same dtype and device, receives a gradient.
        positive: ``[M]`` int64 indices into ``keys``.
        bank: ``[K, D]`` or ``None``; a buffer (queue) that gets no gradient: it must not require grad.
        temperature: > 0.
        group_size: see above; ``N`` must be divisible by it.
        impl: ``"fused"`` (the compiled operator) or ``"reference"`` (plain PyTorch).

    Returns:
        ``(loss, lse)``, both ``[M]`` in fp32 (fp64 for fp64 inputs), with
        ``loss[i] = lse[i] - query[i] . keys[positive[i]] / temperature``.
    """
    _checks.no_grad_buffer(bank, "upreid::info_nce", "bank", _BANK_WHY)
    return _dispatch.call("info_nce", impl, _fused, reference.info_nce,
                          (query, keys, positive, bank, temperature, group_size))


_BANK_WHY = "the bank is a buffer that receives no gradient"


def _fused(query, keys, positive, bank, temperature, group_size):
    _checks.plain_number(temperature, "upreid::info_nce", "temperature")
    if (bank is not None and torch.is_grad_enabled() and query.requires_grad
            and _lib.has_kernel("_info_nce_train", query.device)):
        # Training: the forward also returns the softmax-weighted bank mean, which saves the backward
        # a second pass over the bank (only grad_query involves the bank).
        loss, lse, _ = torch.ops.upreid._info_nce_train(
            query, keys, positive, bank, float(temperature), int(group_size))
        return loss, lse
    return torch.ops.upreid.info_nce(query, keys, positive, bank, float(temperature), int(group_size))


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


if _lib.HAS_EXTENSION:

    @torch.library.register_fake("upreid::info_nce")
    def _info_nce_fake(query, keys, positive, bank, temperature, group_size):
        # The checks that need no data (the index range is checked by the real kernels).
        _checks.info_nce(query, keys, positive, bank, temperature, group_size)
        m = query.shape[0]
        return query.new_empty((m,), dtype=_acc(query)), query.new_empty((m,), dtype=_acc(query))

    def _grads_fake(query, keys, need_grad_query, need_grad_keys):
        # A gradient not asked for is an empty [0, D] tensor. Gradients are contiguous whatever the
        # inputs' strides (the kernels write them row-major): not empty_like, which keeps a view's strides.
        gq = query.new_empty(tuple(query.shape)) if need_grad_query else query.new_empty((0, query.shape[1]))
        gk = keys.new_empty(tuple(keys.shape)) if need_grad_keys else keys.new_empty((0, keys.shape[1]))
        return gq, gk

    @torch.library.register_fake("upreid::_info_nce_backward")
    def _info_nce_backward_fake(grad_loss, grad_lse, query, keys, positive, bank, lse, temperature,
                                group_size, need_grad_query=True, need_grad_keys=True):
        return _grads_fake(query, keys, need_grad_query, need_grad_keys)

    def _make_autograd(backward_op, saves_bank: bool):
        """setup_context/backward for info_nce (saves the bank, recomputes its tiles) and for
        _info_nce_train (saves bank_mean [M, D] instead, an internal by-product whose gradient,
        zeros since the wrapper never returns it, is ignored)."""

        def setup_context(ctx, inputs, output):
            query, keys, positive, bank, temperature, group_size = inputs
            # Called directly (torch.ops.upreid.*), a bank asking for a gradient would get None.
            _checks.no_grad_buffer(bank, "upreid::info_nce", "bank", _BANK_WHY)
            lse = output[1]
            extra = bank if saves_bank else output[2]
            ctx.save_for_backward(query, keys, positive, extra, lse)
            ctx.args = (temperature, group_size)

        def backward(ctx, grad_loss, grad_lse, *_):
            query, keys, positive, extra, lse = ctx.saved_tensors
            grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss
            grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
            if saves_bank:
                ins = (grad_loss, grad_lse, query, keys, positive, extra, lse)
            else:
                ins = (grad_loss, grad_lse, query, keys, positive, lse, extra)
            need_q, need_k = _dispatch.needs(ctx, 0, 1)
            grad_query, grad_keys = backward_op(*ins, *ctx.args, need_q, need_k)
            return (grad_query if need_q else None), (grad_keys if need_k else None), \
                None, None, None, None

        return backward, setup_context

    _bw, _ctx = _make_autograd(torch.ops.upreid._info_nce_backward, saves_bank=True)
    torch.library.register_autograd("upreid::info_nce", _bw, setup_context=_ctx)

    @torch.library.register_fake("upreid::_info_nce_train")
    def _info_nce_train_fake(query, keys, positive, bank, temperature, group_size):
        loss, lse = _info_nce_fake(query, keys, positive, bank, temperature, group_size)
        return loss, lse, query.new_empty(tuple(query.shape), dtype=_acc(query))

    @torch.library.register_fake("upreid::_info_nce_train_backward")
    def _info_nce_train_backward_fake(grad_loss, grad_lse, query, keys, positive, lse, bank_mean,
                                      temperature, group_size, need_grad_query=True,
                                      need_grad_keys=True):
        return _grads_fake(query, keys, need_grad_query, need_grad_keys)

    _bw, _ctx = _make_autograd(torch.ops.upreid._info_nce_train_backward, saves_bank=False)
    torch.library.register_autograd("upreid::_info_nce_train", _bw, setup_context=_ctx)

    for _name in ("_info_nce_backward", "_info_nce_train_backward"):
        _dispatch.forbid_double_backward(_name, "upreid::info_nce")
