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

import re

ORIGINAL = "original"  # DingXiaoH/RepVGG
TIMM = "timm"

_SEGMENTS = {"rbr_dense": "conv_kxk", "rbr_1x1": "conv_1x1", "rbr_identity": "identity"}
_STAGE = re.compile(r"^stage(\d+)$")


def detect_naming(keys) -> str | None:
    keys = list(keys)
    if any(k.startswith(("stem.", "stages.")) for k in keys):
        return TIMM
    if any(k.startswith(("stage0.", "stage1.", "linear.")) for k in keys):
        return ORIGINAL
    return None


def original_key_to_ours(key: str) -> str:
    parts = key.split(".")
    m = _STAGE.match(parts[0])
    if m:
        s = int(m.group(1))
        parts = ["stem"] + parts[1:] if s == 0 else ["stages", str(s - 1)] + parts[1:]
    elif parts[0] == "linear":
        parts = ["head", "fc"] + parts[1:]
    return ".".join(_SEGMENTS.get(p, p) for p in parts)


def to_our_naming(state_dict: dict) -> tuple[dict, str]:
    """(state_dict in our naming, the naming it came in: 'original', 'timm' or 'unknown')."""
    naming = detect_naming(state_dict)
    if naming == ORIGINAL:
        return {original_key_to_ours(k): v for k, v in state_dict.items()}, ORIGINAL
    return dict(state_dict), naming or "unknown"
