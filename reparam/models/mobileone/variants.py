"""The MobileOne variant table (the paper's Table 8) and its registration in `reparam.models`."""

from __future__ import annotations

from .. import ModelEntry, register
from ..common import replace_config
from .checkpoint_keys import to_our_naming
from .model import MobileOne, MobileOneConfig

VARIANTS: dict[str, MobileOneConfig] = {
    #                              width multipliers      k (branches)          SE pairs per stage
    "mobileone_s0": MobileOneConfig((0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    "mobileone_s1": MobileOneConfig((1.5, 1.5, 2.0, 2.5)),
    "mobileone_s2": MobileOneConfig((1.5, 2.0, 2.5, 4.0)),
    "mobileone_s3": MobileOneConfig((2.0, 2.5, 3.0, 4.0)),
    "mobileone_s4": MobileOneConfig((3.0, 3.5, 3.5, 4.0), se_blocks=(0, 0, 5, 1)),
}


def mobileone_config(name: str, **overrides) -> MobileOneConfig:
    """The config of a variant with some fields replaced (e.g. num_classes=10)."""
    return replace_config(name, VARIANTS[name], overrides)


def build_mobileone(name: str, **overrides) -> MobileOne:
    """A MobileOne variant in training form."""
    return MobileOne(mobileone_config(name, **overrides))


def _register_all() -> None:
    for name, cfg in VARIANTS.items():
        register(ModelEntry(
            name=name,
            family="mobileone",
            factory=lambda _n=name, **kw: build_mobileone(_n, **kw),
            input_size=(3, 224, 224),
            num_classes=cfg.num_classes,
            convert_state_dict=to_our_naming,
            classifier_key="head.fc.weight",
            description=f"MobileOne, widths {cfg.widths}, k={cfg.num_conv_branches}"
                        + (", squeeze-excitation" if any(cfg.se_blocks) else ""),
        ))


_register_all()
