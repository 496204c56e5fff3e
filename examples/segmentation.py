"""Fuse a whole segmentation model, backbone and decoder, with one call.

A small FPN-style decoder on the four feature maps of a FastViT backbone
(`model.forward_intermediates(x)`). `reparam.fuse` is given the complete model, not the backbone
alone: it folds the backbone's reparameterizable blocks and, in the same pass, every Conv+BN of
the decoder.

    python examples/segmentation.py [--size 256] [--classes 21]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam.models import create


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class FPNSegmenter(nn.Module):
    """Feature pyramid: a 1x1 lateral conv per stage, top-down upsampling and addition, a 3x3
    smoothing conv, a 1x1 classifier, and upsampling to the input size."""

    def __init__(self, backbone: nn.Module, num_classes: int, width: int = 64):
        super().__init__()
        self.backbone = backbone
        self.lateral = nn.ModuleList(conv_bn_relu(info["num_chs"], width, 1)
                                     for info in backbone.feature_info)
        self.smooth = conv_bn_relu(width, width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        features = self.backbone.forward_intermediates(x)  # strides 4, 8, 16, 32
        y = self.lateral[-1](features[-1])
        for feature, lateral in zip(features[-2::-1], self.lateral[-2::-1]):
            y = F.interpolate(y, size=feature.shape[-2:], mode="nearest") + lateral(feature)
        y = self.classifier(self.smooth(y))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Fuse a FastViT + FPN segmentation model.")
    parser.add_argument("--size", type=int, default=256, help="input height and width (default 256)")
    parser.add_argument("--classes", type=int, default=21, help="number of classes (default 21)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    # num_classes=0: no classifier; load your weights with create(..., weights="fastvit_t8.pth.tar")
    backbone = create("fastvit_t8", num_classes=0)
    model = FPNSegmenter(backbone, args.classes)
    # Stand-in for training: a few batches in train mode give the BatchNorms real statistics.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, args.size, args.size))
    model.eval()

    x = torch.randn(1, 3, args.size, args.size)
    fused = reparam.fuse(model, x)  # backbone and decoder together; checked against model(x)
    print(fused.report.summary())
    if fused.report.refusals:  # by design: fusing them would cost more than it saves
        print(f"kept as they are, for example: {fused.report.refusals[0].reason}")

    def count(net, kind):
        return sum(isinstance(m, kind) for m in net.modules())

    print(f"\nBatchNorms: {count(model, nn.BatchNorm2d)} -> {count(fused, nn.BatchNorm2d)}, "
          f"convolutions: {count(model, nn.Conv2d)} -> {count(fused, nn.Conv2d)}")
    with torch.no_grad():
        print(f"output {tuple(fused(x).shape)}, max |fused - model| = "
              f"{(fused(x) - model(x)).abs().max().item():.2g}")
    return model, fused


if __name__ == "__main__":
    main()
