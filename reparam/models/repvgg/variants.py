"""The RepVGG variant table (the paper's Table 2, and RepVGG-D2se of the reference release) and
its registration in `reparam.models`."""

from __future__ import annotations

from .. import ModelEntry, register
from ..common import replace_config
from .checkpoint_keys import to_our_naming
from .model import RepVGG, RepVGGConfig

_A = (2, 4, 14, 1)  # blocks per stage of the A models
_B = (4, 6, 16, 1)  # blocks per stage of the B models
_G4 = dict(groups=4, grouped_layers=tuple(range(2, 27, 2)))  # the paper's layers 2, 4, ..., 26

VARIANTS: dict[str, RepVGGConfig] = {
    #                           blocks  width multipliers
    "repvgg_a0": RepVGGConfig(_A, (0.75, 0.75, 0.75, 2.5)),
    "repvgg_a1": RepVGGConfig(_A, (1.0, 1.0, 1.0, 2.5)),
    "repvgg_a2": RepVGGConfig(_A, (1.5, 1.5, 1.5, 2.75)),
    "repvgg_b0": RepVGGConfig(_B, (1.0, 1.0, 1.0, 2.5)),
    "repvgg_b1": RepVGGConfig(_B, (2.0, 2.0, 2.0, 4.0)),
    "repvgg_b1g4": RepVGGConfig(_B, (2.0, 2.0, 2.0, 4.0), **_G4),
    "repvgg_b2": RepVGGConfig(_B, (2.5, 2.5, 2.5, 5.0)),
    "repvgg_b2g4": RepVGGConfig(_B, (2.5, 2.5, 2.5, 5.0), **_G4),
    "repvgg_b3": RepVGGConfig(_B, (3.0, 3.0, 3.0, 5.0)),
    "repvgg_b3g4": RepVGGConfig(_B, (3.0, 3.0, 3.0, 5.0), **_G4),
    "repvgg_d2se": RepVGGConfig((8, 14, 24, 1), (2.5, 2.5, 2.5, 5.0), use_se=True),
}

_INPUT_SIZE = {"repvgg_d2se": (3, 320, 320)}


def repvgg_config(name: str, **overrides) -> RepVGGConfig:
    """The config of a variant with some fields replaced (e.g. num_classes=10)."""
    return replace_config(name, VARIANTS[name], overrides)


def build_repvgg(name: str, **overrides) -> RepVGG:
    """A RepVGG variant in training form."""
    return RepVGG(repvgg_config(name, **overrides))


def _register_all() -> None:
    for name, cfg in VARIANTS.items():
        register(ModelEntry(
            name=name,
            family="repvgg",
            factory=lambda _n=name, **kw: build_repvgg(_n, **kw),
            input_size=_INPUT_SIZE.get(name, (3, 224, 224)),
            num_classes=cfg.num_classes,
            convert_state_dict=to_our_naming,
            classifier_key="head.fc.weight",
            description=f"RepVGG, blocks {cfg.num_blocks}, widths {cfg.widths}"
                        + (f", groups {cfg.groups} in alternate layers" if cfg.grouped_layers else "")
                        + (", squeeze-excitation" if cfg.use_se else ""),
        ))


_register_all()
