"""MobileOne (Vasu et al., CVPR 2023) s0-s4, in training form.

model.py: MobileOneConfig, MobileOneStage, MobileOne; variants.py: the variant table (registered
in `reparam.models`); checkpoint_keys.py: apple/ml-mobileone and timm naming -> ours.
"""

from .model import MobileOne, MobileOneConfig, MobileOneStage
from .variants import VARIANTS, build_mobileone, mobileone_config

__all__ = ["MobileOne", "MobileOneConfig", "MobileOneStage", "VARIANTS", "build_mobileone", "mobileone_config"]
