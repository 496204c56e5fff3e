"""FastViT checkpoint namings and their mapping to ours.

Our state_dict names are timm's (`stem`, `stages.N.downsample/pos_emb/blocks`, `final_conv`,
`head.fc`), so timm checkpoints need no renaming. The original release (apple/ml-fastvit) names
the same tensors differently and flattens stages, patch embeddings and positional encodings into
one list `network`:

    patch_embed.*                     -> stem.*
    network.<i>  (blocks of stage s)  -> stages.<s>.blocks.*
    network.<i>.proj.*                -> stages.<s>.downsample.proj.*   (starts stage s)
    network.<i>.pe.*                  -> stages.<s>.pos_emb.pos_enc.*
    conv_exp.*                        -> final_conv.*
    head.*                            -> head.fc.*
    head.proj  (MobileCLIP, x @ proj) -> head.fc.weight = proj.T, head.fc.bias = 0
    rbr_conv / rbr_scale / rbr_skip   -> conv_kxk / conv_scale / identity
    lkb_origin -> large_conv,  convffn -> mlp,  se.reduce / se.expand -> se.fc1 / se.fc2
    <...>.layer_scale[_1|_2] (a Parameter) -> <...>.layer_scale[_1|_2].gamma

The stage of `network.<i>` is the number of patch embeddings (`network.<j>.proj`, j <= i) before
it, which works for every variant without knowing its configuration.
"""

from __future__ import annotations

import re

APPLE = "apple"  # the original release's naming (ml-fastvit, `.pth.tar` with {'state_dict': ...})
TIMM = "timm"  # timm's naming, which is also ours

_APPLE_MARKERS = ("patch_embed.", "network.", "conv_exp.")
_TIMM_MARKERS = ("stem.", "stages.", "final_conv.")

_SEGMENT_RENAMES = {
    "rbr_conv": "conv_kxk",
    "rbr_scale": "conv_scale",
    "rbr_skip": "identity",
    "lkb_origin": "large_conv",
    "convffn": "mlp",
}
_SE_RENAMES = {"reduce": "fc1", "expand": "fc2"}
_NETWORK = re.compile(r"^network\.(\d+)\.(.*)$")


def detect_naming(keys) -> str | None:
    """'apple', 'timm' (== ours) or None when the keys are in neither FastViT naming."""
    keys = list(keys)
    if any(k.startswith(_TIMM_MARKERS) for k in keys):
        return TIMM
    if any(k.startswith(_APPLE_MARKERS) for k in keys):
        return APPLE
    return None


def apple_key_to_ours(key: str, downsample_indices: list[int]) -> str:
    """One original-release key in our naming. `downsample_indices`: the indices i of
    `network.<i>.proj` entries in the checkpoint, sorted."""
    parts = key.split(".")
    if parts[0] == "patch_embed":
        parts[0] = "stem"
    elif parts[0] == "conv_exp":
        parts[0] = "final_conv"
    elif parts[0] == "head":
        parts.insert(1, "fc")
    elif parts[0] == "network":
        index = int(parts[1])
        stage = sum(1 for i in downsample_indices if i <= index)
        rest = parts[2:]
        if rest[0] == "proj":
            parts = ["stages", str(stage), "downsample"] + rest
        elif rest[0] == "pe":
            parts = ["stages", str(stage), "pos_emb", "pos_enc"] + rest[1:]
        else:
            parts = ["stages", str(stage), "blocks"] + rest
    out = []
    for i, p in enumerate(parts):
        if p in _SEGMENT_RENAMES:
            p = _SEGMENT_RENAMES[p]
        elif p in _SE_RENAMES and i > 0 and parts[i - 1] == "se":
            p = _SE_RENAMES[p]
        out.append(p)
    if out[-1] in ("layer_scale", "layer_scale_1", "layer_scale_2"):
        out.append("gamma")
    return ".".join(out)


def apple_to_ours(state_dict: dict) -> dict:
    """Rename an original-release state_dict to our naming; order and tensors are kept, except
    for MobileCLIP's projection `head.proj` (in_dim, out_dim), applied as `x @ proj`: it becomes
    the classifier `head.fc` (weight `proj.T`, bias zero), the same map."""
    downsample = sorted({int(m.group(1)) for k in state_dict
                         if (m := _NETWORK.match(k)) and m.group(2).startswith("proj.")})
    out = {}
    for k, v in state_dict.items():
        if k == "head.proj" and v.ndim == 2:
            out["head.fc.weight"] = v.t()
            out["head.fc.bias"] = v.new_zeros(v.shape[1])
        else:
            out[apple_key_to_ours(k, downsample)] = v
    return out


def to_our_naming(state_dict: dict) -> tuple[dict, str]:
    """(state_dict in our naming, the naming it came in: 'apple', 'timm' or 'unknown')."""
    naming = detect_naming(state_dict)
    if naming == APPLE:
        return apple_to_ours(state_dict), APPLE
    return dict(state_dict), naming or "unknown"
