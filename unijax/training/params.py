"""Which parameters train: labels from config regexes over parameter paths.

A parameter path is its '/'-joined module path, e.g. `language_model/layers/3/mlp/gate_proj/kernel`.
A parameter is trainable when it matches one of `train.trainable` and none of `train.frozen`
(regexes, `re.fullmatch`). Frozen parameters are split off the model: they get no gradient and no
optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from unijax.models.lora import compile_patterns, path_str  # noqa: F401 (path_str: also for optimizer.py)


def trainable_filter(trainable: Sequence[str], frozen: Sequence[str]):
    """An nnx filter `(path, value) -> bool` selecting trainable parameters."""
    keep, drop = compile_patterns(trainable, "train.trainable"), compile_patterns(frozen, "train.frozen")

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        s = path_str(path)
        return any(r.fullmatch(s) for r in keep) and not any(r.fullmatch(s) for r in drop)

    return is_trainable


def split_trainable(model: nnx.Module, trainable: Sequence[str], frozen: Sequence[str], adapters: bool = False):
    """-> (graphdef, trainable State, frozen State). Raises if nothing would train (`adapters`: LoRA
    adapters will, so no parameter needs to), or if a regex of `train.trainable` / `train.frozen`
    matches no parameter (most likely a typo)."""
    paths = [path_str(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for key, patterns in (("train.trainable", trainable), ("train.frozen", frozen)):
        for r in compile_patterns(patterns, key):
            if not any(r.fullmatch(p) for p in paths):
                raise ValueError(f"{key}: {r.pattern!r} matches no parameter of this model; paths look like "
                                 f"{paths[0]!r}, 'language_model/layers/0/mlp/gate_proj/kernel'")
    graphdef, train_state, frozen_state = nnx.split(model, trainable_filter(trainable, frozen), ...)
    if not jax.tree.leaves(train_state) and not adapters:
        raise ValueError(f"train.trainable={list(trainable)} with train.frozen={list(frozen)} selects no parameter; "
                         f"paths look like 'language_model/layers/0/mlp/gate_proj/kernel'")
    return graphdef, train_state, frozen_state


def count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
