"""RepVGG (Ding et al., CVPR 2021) A0-A2, B0-B3 (with g4 variants) and D2se, in training form.

model.py: RepVGGConfig, RepVGGStage, RepVGG; variants.py: the variant table (registered in
`reparam.models`); checkpoint_keys.py: DingXiaoH/RepVGG and timm naming -> ours.
"""

from .model import RepVGG, RepVGGConfig, RepVGGStage
from .variants import VARIANTS, build_repvgg, repvgg_config

__all__ = ["RepVGG", "RepVGGConfig", "RepVGGStage", "VARIANTS", "build_repvgg", "repvgg_config"]
