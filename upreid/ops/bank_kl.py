"""``upreid::bank_kl``: KL divergence between the teacher's and the student's softmax distributions
over a key bank, fused with both logsumexps (typed wrapper, fake kernel, autograd formula)."""
from __future__ import annotations

import torch
from torch import Tensor

import upreid.ops._checks as _checks
import upreid.ops._dispatch as _dispatch
import upreid.ops._lib as _lib
import upreid.ops.reference as reference


def bank_kl(
    student: Tensor,
    teacher: Tensor,
    bank: Tensor,
    tau_student: float = 0.1,
    tau_teacher: float = 0.1,
    impl: str = "fused",
) -> tuple[Tensor, Tensor, Tensor]:
    """``KL(softmax(teacher . bank / tau_teacher) || softmax(student . bank / tau_student))`` per row.

    Args:
        student: ``[M, D]`` float tensor; the only input that receives a gradient.
        teacher: ``[M, D]``, same dtype/device; a target: it must not require grad (detach it).
        bank: ``[K, D]`` with ``K > 0``; a buffer: it must not require grad.
        tau_student, tau_teacher: temperatures, > 0.
        impl: ``"fused"`` or ``"reference"``.

    Returns:
        ``(kl, lse_student, lse_teacher)``, each ``[M]`` in fp32 (fp64 for fp64 inputs).
    """
    _check_targets(teacher, bank)
    return _dispatch.call("bank_kl", impl, _fused, reference.bank_kl,
                          (student, teacher, bank, tau_student, tau_teacher))


def _check_targets(teacher: Tensor, bank: Tensor) -> None:
    for name, t in (("teacher", teacher), ("bank", bank)):
        _checks.no_grad_buffer(t, "upreid::bank_kl", name, "only the student receives a gradient")


def _fused(student, teacher, bank, tau_student, tau_teacher):
    _checks.plain_number(tau_student, "upreid::bank_kl", "tau_student")
    _checks.plain_number(tau_teacher, "upreid::bank_kl", "tau_teacher")
    args = (student, teacher, bank, float(tau_student), float(tau_teacher))
    if (torch.is_grad_enabled() and student.requires_grad
            and _lib.has_kernel("_bank_kl_train", student.device)):
        # Training: the forward also returns the expected bank vectors of both distributions, so the
        # backward is elementwise and never revisits the bank.
        kl, lse_s, lse_t, _, _ = torch.ops.upreid._bank_kl_train(*args)
        return kl, lse_s, lse_t
    return torch.ops.upreid.bank_kl(*args)


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


if _lib.HAS_EXTENSION:

    @torch.library.register_fake("upreid::bank_kl")
    def _bank_kl_fake(student, teacher, bank, tau_student, tau_teacher):
        _checks.bank_kl(student, teacher, bank, tau_student, tau_teacher)
        m = student.shape[0]
        return tuple(student.new_empty((m,), dtype=_acc(student)) for _ in range(3))

    @torch.library.register_fake("upreid::_bank_kl_backward")
    def _bank_kl_backward_fake(grad_kl, grad_lse_student, student, teacher, bank, lse_student,
                               lse_teacher, tau_student, tau_teacher):
        return student.new_empty(tuple(student.shape))      # contiguous, as the kernels write it

    @torch.library.register_fake("upreid::_bank_kl_train")
    def _bank_kl_train_fake(student, teacher, bank, tau_student, tau_teacher):
        kl, lse_s, lse_t = _bank_kl_fake(student, teacher, bank, tau_student, tau_teacher)
        means = [student.new_empty(tuple(student.shape), dtype=_acc(student)) for _ in range(2)]
        return kl, lse_s, lse_t, *means

    @torch.library.register_fake("upreid::_bank_kl_train_backward")
    def _bank_kl_train_backward_fake(grad_kl, grad_lse_student, student, mean_student,
                                     mean_teacher, tau_student):
        return student.new_empty(tuple(student.shape))      # contiguous, as the kernels write it

    def _setup_context(ctx, inputs, output):
        student, teacher, bank, tau_student, tau_teacher = inputs
        _check_targets(teacher, bank)  # called directly, they would silently get None
        _, lse_s, lse_t = output
        ctx.save_for_backward(student, teacher, bank, lse_s, lse_t)
        ctx.taus = (tau_student, tau_teacher)

    def _backward(ctx, grad_kl, grad_lse_s, grad_lse_t):
        student, teacher, bank, lse_s, lse_t = ctx.saved_tensors
        grad_kl = torch.zeros_like(lse_s) if grad_kl is None else grad_kl
        grad_lse_s = torch.zeros_like(lse_s) if grad_lse_s is None else grad_lse_s
        # grad_lse_t is dropped: the teacher is a target and gets no gradient.
        grad_student = torch.ops.upreid._bank_kl_backward(
            grad_kl, grad_lse_s, student, teacher, bank, lse_s, lse_t, *ctx.taus
        )
        return grad_student, None, None, None, None

    torch.library.register_autograd("upreid::bank_kl", _backward, setup_context=_setup_context)

    def _train_setup_context(ctx, inputs, output):
        student, teacher, bank, tau_student, _ = inputs
        _check_targets(teacher, bank)
        _, lse_s, _, mean_s, mean_t = output
        ctx.save_for_backward(student, lse_s, mean_s, mean_t)
        ctx.tau_student = tau_student

    def _train_backward(ctx, grad_kl, grad_lse_s, *_):
        # The gradients of lse_teacher and of the two means (internal by-products) are ignored.
        student, lse_s, mean_s, mean_t = ctx.saved_tensors
        grad_kl = torch.zeros_like(lse_s) if grad_kl is None else grad_kl
        grad_lse_s = torch.zeros_like(lse_s) if grad_lse_s is None else grad_lse_s
        grad_student = torch.ops.upreid._bank_kl_train_backward(
            grad_kl, grad_lse_s, student, mean_s, mean_t, ctx.tau_student)
        return grad_student, None, None, None, None

    torch.library.register_autograd("upreid::_bank_kl_train", _train_backward,
                                    setup_context=_train_setup_context)

    for _name in ("_bank_kl_backward", "_bank_kl_train_backward"):
        _dispatch.forbid_double_backward(_name, "upreid::bank_kl")
