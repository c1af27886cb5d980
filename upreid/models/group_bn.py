"""Shuffle-BN on one device: BatchNorm with separate statistics per group of the batch, and the seeded
permutation that shuffles the key encoder's batch across those groups.

MoCo (He et al., 2020) computes the key encoder's BN statistics per GPU after shuffling the batch
across GPUs, so that a query and its key never share batch statistics (which otherwise leak which key
is the positive). On one device the same is emulated by cutting the batch into G groups of B / G that
are normalised with their own statistics, as G GPUs would: :class:`GroupBatchNorm` does this in one
call (no loop over chunks), exactly as running BatchNorm on each chunk separately would, with one
running-statistics update per forward. :func:`convert_group_bn` swaps the BatchNorm layers of a
module for it, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does (same parameters and buffers, so
state dicts are unchanged). :class:`SeededPermutation` draws the shuffles from its own generator,
whose state is part of the owning module's state dict (a resumed run draws the same permutations).

Camera-based BN (Zhuang et al., "Rethinking the Distribution Gap of Person Re-identification with
Camera-based Batch Normalization", ECCV 2020) uses the same idea with groups of unequal size: in
fine-tuning (``model.camera_bn``), each camera's images of a batch are normalised with that camera's
statistics (:class:`CameraBatchNorm`, given the batch's cameras by :func:`camera_groups`), so that the
network never sees what a camera adds to all its images; at test time each test camera's statistics
are re-estimated on its images (``eval.camera_bn``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GroupBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are computed per group: the batch ``[B, C, *]`` is cut
    into ``groups`` consecutive chunks of ``B / groups`` and each is normalised with its own mean and
    (biased) variance, i.e. the output equals running ``nn.BatchNorm`` on each chunk separately. The
    affine parameters are shared. Running statistics are updated once per forward, with the mean over
    the groups of their means and of their unbiased variances, at the layer's ``momentum``: the same
    rule as one BatchNorm update (running the chunks one by one would update G times a step) and, for
    groups of exchangeable samples, the same expectation as plain BatchNorm's update. In eval mode (or
    with ``groups = 1``) it is plain BatchNorm. Inputs of 2 to 5 dimensions, as the BatchNorm classes."""

    def __init__(self, num_features: int, groups: int = 1, **kw):
        super().__init__(num_features, **kw)
        self.groups = check_groups(groups)

    def _check_input_dim(self, x: Tensor) -> None:
        if not 2 <= x.dim() <= 5:
            raise ValueError(f"GroupBatchNorm: expected a 2D to 5D input [B, C, ...], got {x.dim()}D")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if self.groups == 1 or not batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        g, b, c = self.groups, x.shape[0], x.shape[1]
        if b % g:
            raise ValueError(f"GroupBatchNorm: a batch of {b} cannot be cut into {g} groups of equal size")
        xg = x.reshape(g, b // g, *x.shape[1:])                         # [G, n, C, *] (a view)
        count = xg[0].numel() // c                                      # values per group and channel
        if count < 2:
            raise ValueError(f"GroupBatchNorm: expected more than 1 value per channel and group when "
                             f"training, got a batch of {b} in {g} groups of input size {list(x.shape)}")
        dims = [1] + list(range(3, xg.dim()))
        xs = xg if xg.dtype in (torch.float32, torch.float64) else xg.float()   # statistics in fp32
        var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)   # [G, 1, C, 1, ...]
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                rv = (var * (count / (count - 1))).mean(0).reshape(c)           # unbiased, mean over groups
                self.running_mean.lerp_(mean.mean(0).reshape(c).to(self.running_mean.dtype), m)
                self.running_var.lerp_(rv.to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps)                             # [G, 1, C, 1, ...]
        if self.weight is not None:
            shape = [1, 1, c] + [1] * (xg.dim() - 3)
            scale = scale * self.weight.view(shape)
            shift = self.bias.view(shape) - mean * scale
        else:
            shift = -mean * scale
        y = torch.addcmul(shift.to(xs.dtype), xs, scale.to(xs.dtype))   # [G, n, C, *]
        return y.to(x.dtype).reshape(x.shape)


class CameraBatchNorm(_BatchNorm):
    """BatchNorm2d whose training-mode statistics are computed per camera: the images of each camera in
    the batch are normalised with their own mean and (biased) variance, i.e. the output equals running
    ``nn.BatchNorm2d`` on each camera's images separately; the affine parameters are shared. The
    cameras are given for each forward by :func:`camera_groups`; without them, and in eval mode, it is
    plain BatchNorm, and so it is on pooled ``[B, C, 1, 1]`` inputs (MGN's reductions), where a camera
    with one image of the batch would have no variance (as the BNNeck's BatchNorm1d, left plain).
    Running statistics are updated once per forward with the mean over the batch's cameras of their
    means and unbiased variances, at the layer's ``momentum`` (as :class:`GroupBatchNorm`). Statistics
    in fp32 for half-precision inputs."""

    def __init__(self, num_features: int, **kw):
        super().__init__(num_features, **kw)
        self.groups_of_batch: Tensor | None = None         # [G, B] one-hot: image b is camera g's

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"CameraBatchNorm: expected a 4D input [B, C, H, W], got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if self.groups_of_batch is None or not batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        b, c = x.shape[0], x.shape[1]
        if self.groups_of_batch.shape[1] != b:
            raise ValueError(f"CameraBatchNorm: {self.groups_of_batch.shape[1]} camera ids for a batch of {b} images")
        spatial = x.shape[2] * x.shape[3]
        if spatial < 2:          # a pooled [B, C, 1, 1] input (MGN's reductions): a camera may hold one value
            return super().forward(x)
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        # per-camera sums and gathers as products with the [G, B] one-hot matrix: deterministic on CUDA,
        # unlike scatter-adds (and the backward of indexing)
        onehot = self.groups_of_batch.to(xs.dtype)                                          # [G, B]
        count = onehot.sum(1, keepdim=True) * spatial                                       # [G, 1]
        mean = (onehot @ xs.sum((2, 3))) / count                                            # [G, C]
        d = xs - (onehot.t() @ mean)[:, :, None, None]                                      # [B, C, H, W]
        var = (onehot @ (d * d).sum((2, 3))) / count                                        # biased, [G, C]
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * (count / (count - 1))).mean(0).to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps)                                                 # [G, C]
        if self.weight is not None:
            scale = scale * self.weight
        y = d * (onehot.t() @ scale)[:, :, None, None]
        if self.bias is not None:
            y = y + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


@contextlib.contextmanager
def camera_groups(module: nn.Module, camids: Tensor):
    """Within the block, every :class:`CameraBatchNorm` of ``module`` normalises each camera's images of
    the batch (``camids [B]``, any integer ids) with their own statistics. One host sync per call (the
    number of distinct cameras); nothing is set when ``module`` has no such layer."""
    layers = [m for m in module.modules() if isinstance(m, CameraBatchNorm)]
    if not layers:
        yield
        return
    if camids.dim() != 1:
        raise ValueError(f"camera_groups: camids must be [B], got shape {list(camids.shape)}")
    ids = torch.unique(camids)                                                      # sorted, [G]
    onehot = (ids.unsqueeze(1) == camids.unsqueeze(0)).float()                      # [G, B]
    for m in layers:
        m.groups_of_batch = onehot
    try:
        yield
    finally:
        for m in layers:
            m.groups_of_batch = None


def convert_camera_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``module`` by a :class:`CameraBatchNorm` with the same
    parameters, buffers and settings (state dicts are unchanged; see :func:`convert_group_bn`).
    BatchNorm1d (the BNNeck, whose camera could hold one image of a batch) is left plain."""
    return _swap_bn(module, (nn.BatchNorm2d,), lambda m: CameraBatchNorm(
        m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats,
        device=_device_of(m), dtype=_dtype_of(m)))


def check_groups(groups) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"BatchNorm groups must be an integer >= 1, got {groups!r}")
    return groups


def convert_group_bn(module: nn.Module, groups: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`GroupBatchNorm` with the same
    parameters, buffers and settings (in place for children; the converted module is returned, which is
    a new object when ``module`` itself is a BatchNorm); set ``groups`` on those already converted.
    Other normalisations (InstanceNorm of IBN-a, SyncBatchNorm, LayerNorm) are left alone."""
    check_groups(groups)
    for m in module.modules():
        if isinstance(m, GroupBatchNorm):
            m.groups = groups
    return _swap_bn(module, _PLAIN_BN, lambda m: GroupBatchNorm(
        m.num_features, groups, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats, device=_device_of(m), dtype=_dtype_of(m)))


def _swap_bn(module: nn.Module, types: tuple, make) -> nn.Module:
    """``module`` with every BatchNorm whose exact type is in ``types`` replaced by ``make(bn)``, which
    takes over its Parameters and running-statistics buffers (the same objects) and training mode."""
    if type(module) in types:
        new = make(module)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias            # the same Parameters
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = _swap_bn(child, types, make)
        if new is not child:
            setattr(module, name, new)
    return module


def _device_of(m: nn.Module):
    t = next(iter(m.parameters()), None) if m.affine else m.running_mean
    return t.device if t is not None else None


def _dtype_of(m: nn.Module):
    t = next(iter(m.parameters()), None) if m.affine else m.running_mean
    return t.dtype if t is not None else None


class SeededPermutation(nn.Module):
    """Random permutations from a generator of its own (CPU), seeded at construction from torch's global
    generator (so a seeded program gets the same sequence) or from ``seed``. Its state is the module's
    extra state: saved in ``state_dict()``, restored by ``load_state_dict`` (a state dict without it, e.g.
    from a version without this module, leaves the generator as it is instead of failing a strict load).
    Drawing does not touch the global generator, whose position other code (a DataLoader starting an
    epoch) moves in ways a resumed run does not repeat."""

    def __init__(self, seed: int | None = None):
        super().__init__()
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()))
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, n: int, device=None) -> Tensor:
        return torch.randperm(n, generator=self.generator).to(device)          # [n]

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"                  # nn.Module's key of get_extra_state()
        if key not in state_dict:       # an older checkpoint: keep this generator's state
            strict = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
