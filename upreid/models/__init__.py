"""Models: the ResNet trunk (torchvision-compatible keys, last stride, IBN-a), heads and the UP-ReID
pre-training module."""
from upreid.models.group_bn import GroupBatchNorm, convert_group_bn
from upreid.models.heads import MLPHead, roi_pool, stripe_boxes, view_stripes_on_original
from upreid.models.resnet import ResNet, load_torchvision_weights, resnet
from upreid.models.upreid import UPReID

__all__ = ["GroupBatchNorm", "MLPHead", "ResNet", "UPReID", "convert_group_bn", "load_torchvision_weights", "resnet",
           "roi_pool", "stripe_boxes", "view_stripes_on_original"]
