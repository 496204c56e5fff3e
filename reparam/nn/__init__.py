"""Building blocks for reparameterizable networks, in training form.

Write your network with these modules (or your own: any plain sum of linear branches works),
train it, then `reparam.fuse(model, example_input)` gives the inference form: each block
below, built in its fusible form, becomes exactly one convolution plus its nonlinearity.
No block has a `reparameterize()` method or a deploy flag.

    from reparam.nn import RepVGGBlock
    net = nn.Sequential(RepVGGBlock(3, 32, stride=2), RepVGGBlock(32, 32), RepVGGBlock(32, 64, stride=2))
    fused = reparam.fuse(net, torch.randn(1, 3, 224, 224))

Blocks (each docstring gives the equation of its branches, the inference form and the paper):
`ConvBN`, `RepVGGBlock`, `MobileOneBlock`, `ACBlock`, `DiverseBranchBlock`,
`LargeKernelReparam`, `RepMixer`, `RepCPE`, `LayerScale`. Helpers: `SqueezeExcite`,
`LayerNorm2d`, `DropPath`, `Dropout`, `Identity` (an identity that leaves no graph node).
"""

from .blocks import ACBlock, ConvBN, DiverseBranchBlock, LargeKernelReparam, MobileOneBlock, RepVGGBlock
from .layers import DropPath, Dropout, Identity, LayerNorm2d, SqueezeExcite
from .mixers import LayerScale, RepCPE, RepMixer

__all__ = [
    "ConvBN", "RepVGGBlock", "MobileOneBlock", "ACBlock", "DiverseBranchBlock", "LargeKernelReparam",
    "RepMixer", "RepCPE", "LayerScale",
    "SqueezeExcite", "LayerNorm2d", "DropPath", "Dropout", "Identity",
]
