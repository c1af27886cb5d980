"""Supervised ReID models for fine-tuning: the BoT baseline (Luo et al., 2019) and MGN (Wang et al.,
2018, the LUPerson fine-tuning protocol).

Both expose ``trunk`` (a :class:`upreid.models.ResNet`, the part an initialisation loads into) and
return, in training, a dict ``{"logits": [list of [B, N]], "triplet": [list of [B, D]]}`` (one entry
per supervised feature) and, in evaluation, the retrieval feature ``[B, D]``.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from upreid.models.resnet import BasicBlock, ResNet, check_trunk


class GeM(nn.Module):
    """Generalised-mean pooling ``(mean x^p)^(1/p)`` over the spatial dims (Radenovic et al.);
    p = 1 is average pooling, p -> inf max pooling. ``p`` is learned when ``learn_p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = False):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:                       # [B, C, h, w] -> [B, C]
        p = self.p.float()
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p).to(x.dtype)


def make_pool(kind: str, gem_p: float = 3.0) -> nn.Module:
    if kind == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "max":
        return nn.AdaptiveMaxPool2d(1)
    if kind == "gem":
        return GeM(gem_p)
    raise ValueError(f"pooling must be one of avg, max, gem, got {kind!r}")


def _pool(pool: nn.Module, x: Tensor) -> Tensor:
    out = pool(x)
    return out.flatten(1) if out.dim() == 4 else out              # [B, C]


class BNNeck(nn.Module):
    """BN without a learned shift between the triplet feature and the classifier (BoT's BNNeck)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


def _classifier(dim: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(fc.weight, std=0.001)
    return fc


class BoT(nn.Module):
    """ResNet (last stride 1) -> pooling -> f_t (triplet) -> BNNeck -> f_i -> classifier (ID loss).
    The retrieval feature is f_i (``test_feature="bn"``, BoT's choice) or f_t (``"pre"``)."""
    NEW_LAYERS = ("neck", "classifier")        # what no initialisation provides (optim.trunk_lr_mult)

    def __init__(self, num_classes: int, depth: int = 50, last_stride: int = 1, ibn: bool = False,
                 neck: bool = True, pooling: str = "avg", gem_p: float = 3.0, test_feature: str = "bn",
                 trunk: nn.Module | None = None, width: int = 64):
        super().__init__()
        # an injected trunk: any [B, 3, H, W] -> [B, C, h, w] module with out_channels = C
        self.trunk = ResNet(depth, last_stride=last_stride, ibn=ibn, width=width) if trunk is None else trunk
        dim = check_trunk(self.trunk, "BoT")
        self.pool = make_pool(pooling, gem_p)
        self.neck = BNNeck(dim) if neck else nn.Identity()
        self.classifier = _classifier(dim, num_classes)
        self.test_feature = test_feature
        self.feat_dim = dim

    def forward(self, x: Tensor):
        f_t = _pool(self.pool, self.trunk(x))                     # [B, C]
        f_i = self.neck(f_t)                                      # [B, C]
        if not self.training:
            return f_i if self.test_feature == "bn" else f_t
        return {"logits": [self.classifier(f_i)], "triplet": [f_t]}


def _layer_with_stride(layer: nn.Sequential, stride: int) -> nn.Sequential:
    """A copy of a ResNet layer with its first block's stride set (same weights, other resolution)."""
    layer = copy.deepcopy(layer)
    block = layer[0]
    conv = block.conv1 if isinstance(block, BasicBlock) else block.conv2
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)
    return layer


class _Reduce(nn.Module):
    """1x1 conv C -> D + BN + ReLU on a pooled feature (MGN's reduction)."""

    def __init__(self, c: int, d: int):
        super().__init__()
        self.conv = nn.Conv2d(c, d, 1, bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in")

    def forward(self, x: Tensor) -> Tensor:                       # [B, C] -> [B, D]
        return self.relu(self.bn(self.conv(x[:, :, None, None]))).flatten(1)


class MGN(nn.Module):
    """Multiple Granularity Network. The trunk up to ``layer3[0]`` is shared; three branches copy
    ``layer3[1:]`` and ``layer4``: p1 keeps layer 4's stride 2 (global only), p2 and p3 use stride 1
    and add 2 and 3 horizontal stripes. Every pooled feature (3 global + 5 stripes) is reduced to
    ``dim`` by 1x1 conv + BN + ReLU and has its own classifier; the triplet loss sees the 3 reduced
    globals; the retrieval feature is the 8 reduced features concatenated (``8 * dim``)."""
    NEW_LAYERS = ("reduce", "classifiers")     # what no initialisation provides (optim.trunk_lr_mult)

    def __init__(self, num_classes: int, depth: int = 50, ibn: bool = False, dim: int = 256,
                 pooling: str = "gem", gem_p: float = 3.0, trunk: ResNet | None = None, width: int = 64,
                 **_unused):
        super().__init__()
        if trunk is not None and not isinstance(trunk, ResNet):
            raise TypeError(f"MGN: an injected trunk must be a ResNet (MGN copies its layer3 and layer4 into "
                            f"three branches), got {type(trunk).__name__}; e.g. ResNet(18, last_stride=1, width=8)")
        if trunk is not None and trunk.last_stride != 1:
            raise ValueError("MGN: an injected ResNet trunk must have last_stride=1 (branches p2 and p3 keep "
                             f"layer 4 at stride 1), got {trunk.last_stride}")
        self.trunk = ResNet(depth, last_stride=1, ibn=ibn, width=width) if trunk is None else trunk   # the initialised weights
        c = self.trunk.out_channels
        t = self.trunk
        self.p1 = nn.Sequential(copy.deepcopy(t.layer3[1:]), _layer_with_stride(t.layer4, 2))
        self.p2 = nn.Sequential(copy.deepcopy(t.layer3[1:]), copy.deepcopy(t.layer4))
        self.p3 = nn.Sequential(copy.deepcopy(t.layer3[1:]), copy.deepcopy(t.layer4))
        self.pool = make_pool(pooling, gem_p)
        self.reduce = nn.ModuleList([_Reduce(c, dim) for _ in range(8)])
        self.classifiers = nn.ModuleList([_classifier(dim, num_classes) for _ in range(8)])
        self.feat_dim = 8 * dim
        # The trunk's own layer3[1:] and layer4 only carry loaded weights to the branches: frozen, so that
        # the optimizer and DDP (which rejects parameters without a gradient) leave them out.
        for p in list(t.layer3[1:].parameters()) + list(t.layer4.parameters()):
            p.requires_grad_(False)

    def sync_branches(self) -> None:
        """Copy the trunk's (freshly loaded) layer3[1:] / layer4 weights into the three branches."""
        t = self.trunk
        for branch in (self.p1, self.p2, self.p3):
            branch[0].load_state_dict(t.layer3[1:].state_dict())
            branch[1].load_state_dict(t.layer4.state_dict())

    def _stripes(self, fmap: Tensor, n: int) -> list:
        h = fmap.shape[2]
        edges = [round(i * h / n) for i in range(n + 1)]
        return [_pool(self.pool, fmap[:, :, edges[i]:max(edges[i + 1], edges[i] + 1)]) for i in range(n)]

    def forward(self, x: Tensor):
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        x = t.layer3[0](t.layer2(t.layer1(x)))                     # [B, C/2, H/16, W/16]
        m1, m2, m3 = self.p1(x), self.p2(x), self.p3(x)            # [B, C, h, w] each
        pooled = [_pool(self.pool, m1), _pool(self.pool, m2), _pool(self.pool, m3)]
        pooled += self._stripes(m2, 2) + self._stripes(m3, 3)     # 8 x [B, C]
        reduced = [r(p) for r, p in zip(self.reduce, pooled)]      # 8 x [B, dim]
        if not self.training:
            return torch.cat(reduced, dim=1)                       # [B, 8 * dim]
        return {"logits": [fc(f) for fc, f in zip(self.classifiers, reduced)], "triplet": reduced[:3]}


def build_reid_model(arch: str, num_classes: int, **kw) -> nn.Module:
    if arch == "bot":
        return BoT(num_classes, **kw)
    if arch == "mgn":
        return MGN(num_classes, **kw)
    raise ValueError(f"model.arch must be 'bot' or 'mgn', got {arch!r}")


def reid_model_from_config(model_cfg, num_classes: int, trunk: nn.Module | None = None) -> nn.Module:
    """The fine-tuning model of a config's ``model`` section (what training builds and what a
    fine-tuning checkpoint is loaded into); ``trunk`` replaces the ResNet it describes."""
    m = model_cfg
    extra = {"dim": m["mgn_dim"]} if m["arch"] == "mgn" else {}
    return build_reid_model(m["arch"], num_classes, depth=m["depth"], width=m.get("width", 64),
                            last_stride=m["last_stride"], ibn=m["ibn"],
                            neck=m["neck"], pooling=m["pooling"], gem_p=m["gem_p"],
                            test_feature=m["test_feature"], trunk=trunk, **extra)

