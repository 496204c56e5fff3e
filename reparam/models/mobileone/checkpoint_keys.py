"""MobileOne checkpoint namings and their mapping to ours.

Ours is timm's (`stem`, `stages.<s>.<i>`, `head.fc`) with squeeze-excitation named `se` (as in
timm's FastViT and `reparam.nn.MobileOneBlock`) where timm's MobileOne says `attn`:

    timm:   <block>.attn.fc1/fc2              -> <block>.se.fc1/fc2

The original release (apple/ml-mobileone) numbers stages from the stem:

    stage0.*                          -> stem.*
    stage<s>.<i>.*  (s >= 1)          -> stages.<s-1>.<i>.*
    linear.*                          -> head.fc.*
    rbr_conv / rbr_scale / rbr_skip   -> conv_kxk / conv_scale / identity
    se.reduce / se.expand             -> se.fc1 / se.fc2
"""

from __future__ import annotations

from ..common import release_stage_naming, release_stage_parts

APPLE = "apple"  # apple/ml-mobileone
TIMM = "timm"

_SEGMENTS = {"rbr_conv": "conv_kxk", "rbr_scale": "conv_scale", "rbr_skip": "identity"}
_SE = {"reduce": "fc1", "expand": "fc2"}


def detect_naming(keys) -> str | None:
    return release_stage_naming(keys, APPLE)


def apple_key_to_ours(key: str) -> str:
    parts = release_stage_parts(key.split("."))
    out = []
    for i, p in enumerate(parts):
        if p in _SEGMENTS:
            p = _SEGMENTS[p]
        elif p in _SE and i > 0 and parts[i - 1] == "se":
            p = _SE[p]
        out.append(p)
    return ".".join(out)


def timm_key_to_ours(key: str) -> str:
    parts = key.split(".")
    return ".".join("se" if p == "attn" and i + 1 < len(parts) and parts[i + 1] in ("fc1", "fc2") else p
                    for i, p in enumerate(parts))


def to_our_naming(state_dict: dict) -> tuple[dict, str]:
    """(state_dict in our naming, the naming it came in: 'apple', 'timm' or 'unknown')."""
    naming = detect_naming(state_dict)
    if naming == APPLE:
        return {apple_key_to_ours(k): v for k, v in state_dict.items()}, APPLE
    if naming == TIMM:
        return {timm_key_to_ours(k): v for k, v in state_dict.items()}, TIMM
    return dict(state_dict), "unknown"
