"""The FastViT variant table and its registration in `reparam.models`.

Each row is a complete `FastViTConfig`; numbers from the paper's Table 1 and the reference code.
MobileCLIP image towers (mci0/1/2) reuse the blocks with GELU after the large-kernel conv of the
patch embeddings, squeeze-excitation in the last two patch embeddings and a 512-wide projection
in place of the ImageNet classifier; the MobileCLIP2 towers (mci3/4) are described at `_MCI2`.
"""

from __future__ import annotations

import dataclasses

from ...errors import InputError
from .. import ModelEntry, register
from .checkpoint_keys import to_our_naming
from .model import FastViT, FastViTConfig

_RM = ("repmixer",) * 4
_SA = ("repmixer", "repmixer", "repmixer", "attention")
_NO_CPE = (False, False, False, False)
_CPE3 = (False, False, False, True)  # RepCPE before the last (attention) stage
_MCI = dict(mlp_ratio=3.0, token_mixers=_SA, pos_embs=_CPE3,
            se_downsamples=(False, False, True, True), lkc_use_act=True, num_classes=512)
# MobileCLIP2 towers: five stages, attention (with RepCPE) in the last two, LayerNorm2d before
# attention, no SE in patch embeddings, no scale branches in the stem, 768-wide projection.
_MCI2 = dict(mlp_ratio=4.0, token_mixers=("repmixer",) * 3 + ("attention",) * 2,
             pos_embs=(False, False, False, True, True), se_downsamples=(False,) * 5, lkc_use_act=True,
             attn_norm="layernorm", stem_scale_branch=False, num_classes=768)

VARIANTS: dict[str, FastViTConfig] = {
    #                            layers          widths               mlp  mixers  RepCPE
    "fastvit_t8": FastViTConfig((2, 2, 4, 2), (48, 96, 192, 384), 3.0, _RM, _NO_CPE),
    "fastvit_t12": FastViTConfig((2, 2, 6, 2), (64, 128, 256, 512), 3.0, _RM, _NO_CPE),
    "fastvit_s12": FastViTConfig((2, 2, 6, 2), (64, 128, 256, 512), 4.0, _RM, _NO_CPE),
    "fastvit_sa12": FastViTConfig((2, 2, 6, 2), (64, 128, 256, 512), 4.0, _SA, _CPE3),
    "fastvit_sa24": FastViTConfig((4, 4, 12, 4), (64, 128, 256, 512), 4.0, _SA, _CPE3),
    "fastvit_sa36": FastViTConfig((6, 6, 18, 6), (64, 128, 256, 512), 4.0, _SA, _CPE3,
                                  layer_scale_init=1e-6),
    "fastvit_ma36": FastViTConfig((6, 6, 18, 6), (76, 152, 304, 608), 4.0, _SA, _CPE3,
                                  layer_scale_init=1e-6),
    "fastvit_mci0": FastViTConfig(layers=(2, 6, 10, 2), embed_dims=(64, 128, 256, 512), **_MCI),
    "fastvit_mci1": FastViTConfig(layers=(4, 12, 20, 4), embed_dims=(64, 128, 256, 512), **_MCI),
    "fastvit_mci2": FastViTConfig(layers=(4, 12, 24, 4), embed_dims=(80, 160, 320, 640), **_MCI),
    "fastvit_mci3": FastViTConfig(layers=(2, 12, 24, 4, 2), embed_dims=(96, 192, 384, 768, 1536), **_MCI2),
    "fastvit_mci4": FastViTConfig(layers=(2, 12, 24, 4, 4), embed_dims=(128, 256, 512, 1024, 2048), **_MCI2),
}

_TUPLE_FIELDS = {f.name for f in dataclasses.fields(FastViTConfig) if "tuple" in str(f.type)}


def fastvit_config(name: str, **overrides) -> FastViTConfig:
    """The config of a variant with some fields replaced (e.g. drop_path_rate=0.1)."""
    base = VARIANTS[name]
    known = {f.name for f in dataclasses.fields(FastViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"{name} has no option {', '.join(map(repr, unknown))}; "
                         f"options: {', '.join(sorted(known))}")
    overrides = {k: tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v
                 for k, v in overrides.items()}
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid options for {name}: {exc}") from exc


def build_fastvit(name: str, **overrides) -> FastViT:
    """A FastViT variant in training form."""
    return FastViT(fastvit_config(name, **overrides))


def _register_all() -> None:
    for name, cfg in VARIANTS.items():
        kind = "MobileCLIP image tower" if name.startswith("fastvit_mci") else "FastViT"
        register(ModelEntry(
            name=name,
            family="fastvit",
            factory=lambda _n=name, **kw: build_fastvit(_n, **kw),
            input_size=(3, 256, 256),
            num_classes=cfg.num_classes,
            convert_state_dict=to_our_naming,
            classifier_key="head.fc.weight",
            description=f"{kind}, layers {cfg.layers}, widths {cfg.embed_dims}, "
                        f"mixers {'/'.join(m[:3] for m in cfg.token_mixers)}",
        ))


_register_all()
