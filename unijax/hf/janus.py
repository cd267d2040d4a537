"""Name and layout mapping between unijax's parameters and transformers' state dicts, for every
model family (`Family.hf_renames`; `RENAMES`: `Janus` <-> `JanusForConditionalGeneration`).

One table of path renames per family plus per-leaf hooks:
- renames: ordered regex substitutions from our dotted parameter path to the HF name;
- `LEAF_HOOKS`: our leaf name -> (HF leaf name, hook) where the hook turns our array into the HF
  tensor layout by rank (linear kernels are transposed, conv kernels go HWIO <-> OIHW);
- scanned decoder layers (`model.scan_layers`) are stacked / unstacked along axis 0.
"""

from __future__ import annotations

import re

import numpy as np

from unijax.models.family import janus as janus_family

RENAMES = janus_family.HF_RENAMES

# our leaf -> HF leaf
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "weight": "weight", "bias": "bias",
              "running_mean": "running_mean", "running_var": "running_var",
              # TA-MoE (unijax/hf/modeling_ta_moe.py keeps unijax's names and stacked expert layout)
              "alpha": "alpha", "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}

# kernel rank -> the axis permutation from our layout to transformers' (linear [in, out] -> [out, in],
# conv HWIO -> OIHW, Conv3d THWIO -> OITHW); the import direction is its inverse
KERNEL_TO_HF = {2: (1, 0), 4: (3, 2, 0, 1), 5: (4, 3, 0, 1, 2)}


def to_hf_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and x.ndim in KERNEL_TO_HF:
        return np.ascontiguousarray(x.transpose(KERNEL_TO_HF[x.ndim]))
    return x


def from_hf_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and x.ndim in KERNEL_TO_HF:
        return np.ascontiguousarray(x.transpose(np.argsort(KERNEL_TO_HF[x.ndim])))
    return x


def hf_name(path: str, renames=None) -> str:
    """Our dotted path (unscanned, with layer index) -> HF tensor name (`renames`: the family's table)."""
    head, leaf = path.rsplit(".", 1)
    name = head + "."
    for pattern, repl in (RENAMES if renames is None else renames):
        name = re.sub(pattern, repl, name)
    if leaf not in LEAF_NAMES:
        raise KeyError(f"no HF name for parameter leaf '{path}'")
    return name + LEAF_NAMES[leaf]


SCANNED = "language_model.layers."


def is_stacked(path: str, scanned: bool) -> bool:
    """Whether our parameter at `path` stacks the decoder layers along axis 0."""
    return scanned and path.startswith(SCANNED)


def expand_scanned(path: str, num_layers: int, scanned: bool) -> list[str]:
    """A stacked decoder-layer path stands for one unscanned path per layer."""
    if is_stacked(path, scanned):
        rest = path[len(SCANNED):]
        return [f"{SCANNED}{i}.{rest}" for i in range(num_layers)]
    return [path]


def import_tensor(path: str, get, num_layers: int, scanned: bool, renames=None) -> np.ndarray:
    """Our parameter at `path`, built from HF tensors fetched with `get(hf_name)`."""
    leaf = path.rsplit(".", 1)[1]
    parts = [from_hf_layout(leaf, get(hf_name(p, renames))) for p in expand_scanned(path, num_layers, scanned)]
    return np.stack(parts) if is_stacked(path, scanned) else parts[0]


def export_tensors(path: str, x: np.ndarray, num_layers: int, scanned: bool, renames=None) -> dict[str, np.ndarray]:
    """HF tensors {name: array} for our parameter at `path`."""
    leaf = path.rsplit(".", 1)[1]
    if not is_stacked(path, scanned):
        return {hf_name(path, renames): to_hf_layout(leaf, x)}
    return {hf_name(p, renames): to_hf_layout(leaf, np.asarray(x[i]))  # a stacked scalar (TA-MoE alpha) stays an array
            for i, p in enumerate(expand_scanned(path, num_layers, scanned))}
