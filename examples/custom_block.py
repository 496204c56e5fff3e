"""Fuse a network built from your own reparameterizable block, with one call.

The block below is not one reparam knows: a 3x3, a 1x3 and a 3x1 convolution, each with its
BatchNorm, summed with `+=`, scaled per channel (a layer scale) and added to the input. Nothing in
it says how to fuse it. `reparam.fuse` traces the network, finds that every block is linear up to
its ReLU, and replaces it by a single 3x3 convolution, exactly:

    python examples/custom_block.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import reparam


def conv_bn(channels: int, kernel: tuple[int, int]) -> nn.Sequential:
    padding = (kernel[0] // 2, kernel[1] // 2)
    return nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=padding, bias=False),
                         nn.BatchNorm2d(channels))


class CrossBlock(nn.Module):
    """relu(x + scale * (bn(conv3x3(x)) + bn(conv1x3(x)) + bn(conv3x1(x))))"""

    def __init__(self, channels: int):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(channels, (3, 3)), conv_bn(channels, (1, 3)),
                                       conv_bn(channels, (3, 1))])
        self.scale = nn.Parameter(torch.full((channels, 1, 1), 0.5))
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out += branch(x)
        return self.act(x + self.scale * out)


class Net(nn.Module):
    def __init__(self, channels: int = 32, depth: int = 4, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*[CrossBlock(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Fuse a network made of a custom block.")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = Net()
    # Stand-in for training: a few batches in train mode give the BatchNorms real statistics.
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, 3, args.size, args.size))
    model.eval()

    x = torch.randn(1, 3, args.size, args.size)
    fused = reparam.fuse(model, x)  # checks fused(x) against model(x); raises if they differ
    print(fused.report)

    convs = [sum(isinstance(m, nn.Conv2d) for m in net.modules()) for net in (model, fused)]
    with torch.no_grad():
        diff = (fused(x) - model(x)).abs().max().item()
    print(f"\nconvolutions: {convs[0]} -> {convs[1]}, max |fused - model| = {diff:.2g}")
    return model, fused


if __name__ == "__main__":
    main()
