"""The distributed helpers of the package, in one place: joining the process group under
``torchrun``, and the collectives the model and the trainer need (no-ops in one process)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """``[B, ...]`` on every rank -> ``[world * B, ...]``, rank order; no gradient (MoCo's helper)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle(x: Tensor, draw=None) -> tuple[Tensor, Tensor]:
    """Shuffle-BN, step 1: gather the batch of all ranks, permute it with one permutation drawn on
    rank 0 and give each rank a slice, so that the key encoder's BatchNorm statistics mix samples of
    other ranks and cannot leak which key belongs to which query. ``draw(n, device)`` gives the
    permutation (every rank draws, rank 0's is used; default: the global generator, whose position a
    resumed run does not repeat). Returns (this rank's slice, the inverse permutation)."""
    local = x.shape[0]
    gathered = concat_all_gather(x)                                    # [W*B, ...]
    n = gathered.shape[0]
    perm = draw(n, x.device) if draw is not None else torch.randperm(n, device=x.device)
    dist.broadcast(perm, src=0)
    idx = perm.view(world_size(), local)[rank()]
    return gathered[idx], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: Tensor, unshuffle: Tensor) -> Tensor:
    """Shuffle-BN, step 2: undo :func:`batch_shuffle` on the encoder's output ``[B, ...]``."""
    local = x.shape[0]
    gathered = concat_all_gather(x)                                    # [W*B, ...]
    idx = unshuffle.view(world_size(), local)[rank()]
    return gathered[idx]


# ------------------------------------------------------------------------------------- the trainer's
def setup(device: torch.device) -> tuple[int, int]:
    """(rank, world) from torchrun's environment; joins the process group when WORLD_SIZE > 1 (NCCL
    on GPUs, gloo on CPU). ``device`` is this process's device (``cuda:LOCAL_RANK`` or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank_ = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank_, world


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on one of them."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
