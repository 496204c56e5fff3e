"""FastViT (Vasu et al., ICCV 2023) and the MobileCLIP image towers, in training form.

blocks.py: MobileOne block, large-kernel conv, RepMixer, ConvFFN, RepCPE, attention;
model.py: FastViTConfig, FastViTStage, FastViT; variants.py: the variant table (registered in
`reparam.models`); checkpoint_keys.py: original (apple) and timm checkpoint naming -> ours.
"""

from .model import FastViT, FastViTConfig, FastViTStage
from .variants import VARIANTS, build_fastvit, fastvit_config

__all__ = ["FastViT", "FastViTConfig", "FastViTStage", "VARIANTS", "build_fastvit", "fastvit_config"]
