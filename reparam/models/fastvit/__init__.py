"""FastViT (Vasu et al., ICCV 2023) and the MobileCLIP / MobileCLIP2 image towers, in training form.

blocks.py: patch embedding, stem, ConvFFN, attention and the MetaFormer blocks, built on the
public blocks of `reparam.nn` (MobileOne block, large-kernel conv, RepMixer, RepCPE, layer
scale); model.py: FastViTConfig, FastViTStage, FastViT; variants.py: the variant table
(registered in `reparam.models`); checkpoint_keys.py: original (apple) and timm naming -> ours.
"""

from .model import FastViT, FastViTConfig, FastViTStage
from .variants import VARIANTS, build_fastvit, fastvit_config

__all__ = ["FastViT", "FastViTConfig", "FastViTStage", "VARIANTS", "build_fastvit", "fastvit_config"]
