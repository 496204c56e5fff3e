"""Tiny models for the tests of the deployment formats (pte, coreml) and of the comparison,
importable as `deploy_models:<factory>` by the command line (this folder is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(0.3 * torch.randn(m.weight.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


class FourStages(nn.Module):
    """A toy backbone: four feature maps at strides 1, 2, 4, 8, of very different scales."""

    def __init__(self):
        super().__init__()
        widths = [3, 4, 6, 8, 10]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, 1 if i == 0 else 2, 1, bias=False),
                          nn.BatchNorm2d(widths[i + 1]), nn.ReLU())
            for i in range(4))
        self.register_buffer("scales", torch.tensor([100.0, 10.0, 1.0, 1e-4]))

    def forward(self, x):
        features = []
        for stage, scale in zip(self.stages, self.scales):
            x = stage(x)
            features.append(x * scale)
        return tuple(features)


def four_stages() -> nn.Module:
    return _randomize(FourStages())


class SmallOutputWrong(nn.Module):
    """What a broken exporter might produce: the last (smallest) feature map five times too large."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        *rest, last = self.model(x)
        return (*rest, last * 5)


class HistogramHead(nn.Module):
    """A conv+BN followed by torch.histc: an operator neither XNNPACK, ExecuTorch's Core ATen set
    nor coremltools implements."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.histc(self.bn(self.conv(x)), bins=8, min=-2.0, max=2.0)


def histogram_head() -> nn.Module:
    return _randomize(HistogramHead())


def run_pte(path, x):
    """Run a .pte file with the ExecuTorch runtime: the list of its outputs."""
    from executorch.runtime import Runtime

    return list(Runtime.get().load_program(str(path)).load_method("forward").execute([x]))
