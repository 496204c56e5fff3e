"""RepVGG checkpoint namings and their mapping to ours.

Ours is timm's (`stem`, `stages.<s>.<i>`, `head.fc`; branches `identity`, `conv_kxk`,
`conv_1x1`, squeeze-excitation `attn`), so timm checkpoints need no renaming. The original
release (DingXiaoH/RepVGG) numbers stages from the stem:

    stage0.*                                 -> stem.*
    stage<s>.<i>.*  (s >= 1)                 -> stages.<s-1>.<i>.*
    linear.*                                 -> head.fc.*
    rbr_dense / rbr_1x1 / rbr_identity       -> conv_kxk / conv_1x1 / identity
"""

from __future__ import annotations

from ..common import release_stage_naming, release_stage_parts

ORIGINAL = "original"  # DingXiaoH/RepVGG
TIMM = "timm"

_SEGMENTS = {"rbr_dense": "conv_kxk", "rbr_1x1": "conv_1x1", "rbr_identity": "identity"}


def detect_naming(keys) -> str | None:
    return release_stage_naming(keys, ORIGINAL)


def original_key_to_ours(key: str) -> str:
    parts = release_stage_parts(key.split("."))
    return ".".join(_SEGMENTS.get(p, p) for p in parts)


def to_our_naming(state_dict: dict) -> tuple[dict, str]:
    """(state_dict in our naming, the naming it came in: 'original', 'timm' or 'unknown')."""
    naming = detect_naming(state_dict)
    if naming == ORIGINAL:
        return {original_key_to_ours(k): v for k, v in state_dict.items()}, ORIGINAL
    return dict(state_dict), naming or "unknown"
