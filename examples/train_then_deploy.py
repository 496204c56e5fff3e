"""Train in training form, then fuse, export to ONNX and check the file against the trained model.

The network is written the way it trains best: RepVGG blocks (3x3 conv + 1x1 conv + BatchNorm
skip, each with its BatchNorm). After training, `reparam.export.export_model` fuses every block
into one 3x3 convolution, writes an ONNX file with a dynamic batch axis, and checks it with ONNX
Runtime; the script then runs the file itself and compares it with the trained model.

    pip install "reparam[onnx]"
    python examples/train_then_deploy.py [--steps 30] [--output repvgg_tiny.onnx]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from reparam.export import export_model
from reparam.optional import require


class RepVGGBlock(nn.Module):
    """relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)); the skip only where the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.conv3(x) + self.conv1(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return F.relu(out)


def tiny_repvgg(num_classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        RepVGGBlock(3, 16, stride=2), RepVGGBlock(16, 16),
        RepVGGBlock(16, 32, stride=2), RepVGGBlock(32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def toy_batch(g: torch.Generator, batch: int = 32, size: int = 32):
    """Images whose class is the quadrant holding a bright square: learnable in a few steps."""
    labels = torch.randint(0, 4, (batch,), generator=g)
    images = torch.randn(batch, 3, size, size, generator=g) * 0.3
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        top, left = (label // 2) * half, (label % 2) * half
        images[i, :, top + 4:top + half - 4, left + 4:left + half - 4] += 2.0
    return images, labels


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Train, fuse, export to ONNX, compare.")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--output", default="repvgg_tiny.onnx", help="ONNX file to write (replaced)")
    args = parser.parse_args(argv)
    ort = require("onnxruntime", "this example")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = tiny_repvgg()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(1, args.steps + 1):
        images, labels = toy_batch(g)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    images, labels = toy_batch(g, batch=8)
    # fuse, export, check with ONNX Runtime; force=True replaces the file of an earlier run
    result = export_model(model, images[:1], args.output, force=True)
    print(result.summary())

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        trained = model(images)
    diff = (torch.from_numpy(onnx_logits) - trained).abs().max().item()
    accuracy = (trained.argmax(1) == labels).float().mean().item()
    print(f"ONNX Runtime vs the trained model on a batch of {len(images)}: max |diff| = {diff:.2g}"
          f" (logits up to {trained.abs().max().item():.2g}); accuracy {accuracy:.0%}")
    return model, result, diff


if __name__ == "__main__":
    main()
