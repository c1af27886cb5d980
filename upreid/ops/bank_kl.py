"""``upreid::bank_kl``: KL divergence between the teacher's and the student's softmax distributions
over a key bank, fused with both logsumexps (typed wrapper, fake kernel, autograd formula)."""
from __future__ import annotations

import torch
from torch import Tensor

from upreid.ops import _lib, reference


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
    for name, t in (("teacher", teacher), ("bank", bank)):
        if t.requires_grad:
            raise ValueError(
                f"bank_kl: '{name}' requires grad, but only the student receives a gradient; "
                f"pass {name}.detach()"
            )
    if impl == "reference":
        return reference.bank_kl(student, teacher, bank, tau_student, tau_teacher)
    if impl != "fused":
        raise ValueError(f"bank_kl: impl must be 'fused' or 'reference', got {impl!r}")
    if not _lib.use_extension(student):
        return reference.bank_kl(student, teacher, bank, tau_student, tau_teacher)
    return torch.ops.upreid.bank_kl(student, teacher, bank, float(tau_student), float(tau_teacher))


if _lib.HAS_EXTENSION:

    @torch.library.register_fake("upreid::bank_kl")
    def _bank_kl_fake(student, teacher, bank, tau_student, tau_teacher):
        dt = torch.float64 if student.dtype == torch.float64 else torch.float32
        m = student.shape[0]
        return tuple(student.new_empty((m,), dtype=dt) for _ in range(3))

    @torch.library.register_fake("upreid::_bank_kl_backward")
    def _bank_kl_backward_fake(grad_kl, grad_lse_student, student, teacher, bank, lse_student,
                               lse_teacher, tau_student, tau_teacher):
        return torch.empty_like(student)

    def _setup_context(ctx, inputs, output):
        student, teacher, bank, tau_student, tau_teacher = inputs
        _, lse_s, lse_t = output
        ctx.save_for_backward(student, teacher, bank, lse_s, lse_t)
        ctx.taus = (tau_student, tau_teacher)

    def _backward(ctx, grad_kl, grad_lse_s, grad_lse_t):
        student, teacher, bank, lse_s, lse_t = ctx.saved_tensors
        if grad_kl is None:
            grad_kl = torch.zeros_like(lse_s)
        if grad_lse_s is None:
            grad_lse_s = torch.zeros_like(lse_s)
        # grad_lse_t is dropped: the teacher is a target and gets no gradient.
        grad_student = torch.ops.upreid._bank_kl_backward(
            grad_kl, grad_lse_s, student, teacher, bank, lse_s, lse_t, *ctx.taus
        )
        return grad_student, None, None, None, None

    torch.library.register_autograd("upreid::bank_kl", _backward, setup_context=_setup_context)
