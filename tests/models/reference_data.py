"""Reference data of the model tests (tests/data/<family>/) and the loader of the seeded references.

A seeded reference is a complete set of weights that takes a few hundred kilobytes: the weights
are drawn from a seed by a fixed recipe (below), only the BatchNorm statistics are stored
(`<model>.bnstats.safetensors`), and `<model>.seeded.json` holds the seed, the input shape and the
reference implementation's float32 logits, unfused and after its own hand-written fusion.

    ref = load_seeded("fastvit_t8")          # (model, x, logits, meta), model in eval mode
    with torch.no_grad():
        torch.testing.assert_close(ref.model(ref.x), ref.logits, rtol=0, atol=1e-5)

Recipe, version 2: one `torch.Generator().manual_seed(seed)`; over the keys of
`<model>.timm-keys.json` in their listed order, draw each tensor (float32, `generator=g`):

    num_batches_tracked          tensor(0), int64, draws nothing
    running_mean                 randn * 0.2          (then replaced by the stored statistics)
    running_var                  rand * 1.5 + 0.5     (then replaced by the stored statistics)
    ...gamma                     rand * 0.4 + 0.1     (layer scales)
    1-D ...weight                rand * 0.5 + 0.25    (norm scales)
    any other 1-D or 0-D         randn * 0.2          (biases)
    anything else                randn * prod(shape[1:]) ** -0.5

then, from the same generator, the input `x = randn(input_shape)`. The draws of the statistics
matter even though their values are replaced: they move the generator.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import reparam.models as models

DATA = Path(__file__).resolve().parent.parent / "data"
RECIPE = 2

# Every model with a seeded reference in tests/data, by family.
SEEDED = [
    "fastvit_t8", "fastvit_sa12", "fastvit_mci0", "fastvit_mci3", "fastvit_mci4",
    "mobileone_s0", "mobileone_s1", "mobileone_s4",
    "repvgg_a0", "repvgg_b1g4", "repvgg_d2se",
]


class SeededReference(NamedTuple):
    model: nn.Module  # eval mode, seeded weights and stored statistics loaded strictly
    x: torch.Tensor  # the reference input, float32
    logits: torch.Tensor  # the reference's float32 outputs for x, unfused
    meta: dict[str, Any]  # the rest of <model>.seeded.json (logits_timm_fused as a tensor)


def family_of(model_name: str) -> str:
    """'fastvit_t8' -> 'fastvit': the folder of tests/data that holds the model's files."""
    return model_name.split("_", 1)[0]


def data_file(model_name: str, suffix: str) -> Path:
    """tests/data/<family>/<model_name><suffix>, e.g. data_file("repvgg_a0", ".timm-keys.json")."""
    path = DATA / family_of(model_name) / f"{model_name}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"no reference data {path.name} in {path.parent}")
    return path


def read_keys(model_name: str, naming: str = "timm") -> list[tuple[str, tuple[int, ...]]]:
    """[(key, shape), ...] of `<model>.<naming>-keys.json` (naming: timm, apple or original), in
    the module order of the published implementation."""
    data = json.loads(data_file(model_name, f".{naming}-keys.json").read_text())
    if data["model"] != model_name or not data["naming"].startswith(naming):
        raise ValueError(f"{model_name}.{naming}-keys.json describes {data['model']} in {data['naming']}")
    return [(key, tuple(shape)) for key, shape in data["keys"]]


def seeded_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """One tensor of the recipe; draws from `g` (except for num_batches_tracked)."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.int64)
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=g) * 0.2
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g) * 1.5 + 0.5
    if key.endswith("gamma"):
        return torch.rand(shape, generator=g) * 0.4 + 0.1
    if len(shape) == 1 and key.endswith("weight"):
        return torch.rand(shape, generator=g) * 0.5 + 0.25
    if len(shape) <= 1:
        return torch.randn(shape, generator=g) * 0.2
    return torch.randn(shape, generator=g) * math.prod(shape[1:]) ** -0.5


@lru_cache(maxsize=None)
def read_meta(model_name: str) -> dict[str, Any]:
    """<model>.seeded.json as read (logits as nested lists)."""
    meta = json.loads(data_file(model_name, ".seeded.json").read_text())
    if meta.get("recipe") != RECIPE:
        raise ValueError(f"{model_name}.seeded.json uses recipe {meta.get('recipe')}, this loader {RECIPE}")
    return meta


def seeded_state(model_name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(state_dict in timm naming with the stored BatchNorm statistics, reference input)."""
    from safetensors.torch import load_file

    meta = read_meta(model_name)
    g = torch.Generator().manual_seed(meta["seed"])
    state = {key: seeded_tensor(key, shape, g) for key, shape in read_keys(model_name, "timm")}
    x = torch.randn(meta["input_shape"], generator=g)
    stats = load_file(str(data_file(model_name, ".bnstats.safetensors")))
    unknown = sorted(set(stats) - set(state))
    if unknown:
        raise ValueError(f"{model_name}.bnstats.safetensors holds keys not in its key list: {unknown[:3]}")
    state.update(stats)
    return state, x


def load_seeded(model_name: str, **create_kwargs) -> SeededReference:
    """The seeded reference of `model_name`: `reparam.models.create(model_name)` with the rebuilt
    weights loaded strictly (through the model's own checkpoint naming conversion), in eval mode,
    with its input and expected logits."""
    from reparam.checkpoints import load_state

    meta = dict(read_meta(model_name))
    model = models.create(model_name, **create_kwargs)
    state, x = seeded_state(model_name)
    entry = models.get_entry(model_name)
    result = load_state(model, state, source=f"{model_name} (seeded)", convert=entry.convert_state_dict,
                        family=entry.family, model_name=model_name)
    if result.skipped or result.not_loaded:
        raise ValueError(f"{model_name}: seeded state did not fit: skipped {result.skipped[:3]}, "
                         f"not loaded {result.not_loaded[:3]}")
    logits = torch.tensor(meta.pop("logits"), dtype=torch.float32)
    meta["logits_timm_fused"] = torch.tensor(meta["logits_timm_fused"], dtype=torch.float32)
    return SeededReference(model.eval(), x, logits, meta)
