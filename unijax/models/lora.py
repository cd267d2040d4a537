"""LoRA as a reparametrisation of selected weight matrices: `W' = W + (alpha / r) * A @ B`.

Adapters live beside the model, as a pure-dict tree that mirrors the parameter tree
(`{"language_model": {"layers": {0: {"self_attn": {"q_proj": {"kernel": {"a": .., "b": ..}}}}}}}`),
for every parameter whose path (`language_model/layers/0/self_attn/q_proj/kernel`) matches one
of `model.lora.targets` (regexes, `re.fullmatch`). The last two axes of a selected array are its
(in, out) matrix; leading axes (stacked experts `[E, in, out]`, scanned layers `[L, in, out]`)
get one adapter each, so every expert has its own. `a [..., in, r]` starts N(0, 1/in) and
`b [..., r, out]` at zero, so a fresh adapter changes nothing.

Applied at the parameter level (`apply`), the same code adapts attention projections, dense FFNs,
the stacked expert weights and the shared expert of TA-MoE layers alike, and `merge` is the same
function: the merged weights are what the training step computes with. The cost is one `A @ B`
per adapted matrix per step and a dense gradient for it in the backward pass (the base weights
themselves get neither optimizer state nor updates).

`dropout` (PEFT's `lora_dropout`) drops input features of the adapter path: one mask per step and
per adapted matrix (rows of `a`, scaled by 1 / (1 - p)), shared by all the tokens of the batch,
which is what a weight-level reparametrisation can express (PEFT draws one mask per token).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_TARGETS = (
    r"language_model/layers/(\d+/)?self_attn/(q|k|v|o)_proj/kernel",
    r"language_model/layers/(\d+/)?mlp/(experts/)?(gate|up|down)_proj(/kernel)?",
    r"language_model/layers/(\d+/)?mlp/shared/(gate|up|down)_proj(/kernel)?",
)


def _key(entry):
    """One entry of an nnx or jax.tree_util path -> its dict key or sequence index."""
    return getattr(entry, "key", getattr(entry, "idx", entry))


def path_str(path) -> str:
    """`language_model/layers/0/self_attn/q_proj/kernel`: the path that config regexes match."""
    return "/".join(str(_key(p)) for p in path)


def compile_patterns(patterns: Sequence[str] | str, key: str) -> list[re.Pattern]:
    """Config regexes (a tuple, or one comma-separated string) -> compiled; a bad one is an error
    naming the config `key`."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{key}: bad regex {p!r}: {e}") from None
    return out


def selected(params, targets: Sequence[str]) -> list[str]:
    """Paths of the matrices (>= 2 dims) in `params` that the target regexes select; every regex
    must select at least one (a typo is an error naming it)."""
    regexes = compile_patterns(targets, "model.lora.targets")
    paths = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    hits = {r.pattern: [] for r in regexes}
    for s, x in paths:
        for r in regexes:
            if r.fullmatch(s) and len(x.shape) >= 2:
                hits[r.pattern].append(s)
    for pattern, found in hits.items():
        if not found:
            raise ValueError(f"model.lora.targets: {pattern!r} matches no weight matrix among the frozen parameters "
                             f"(paths look like 'language_model/layers/0/self_attn/q_proj/kernel')")
    return sorted({s for found in hits.values() for s in found})


def _set(tree: dict, keys: list, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _keys(path) -> list:
    return [_key(p) for p in path]


def init(params, targets: Sequence[str], rank: int, key: jax.Array, shardings=None) -> tuple[dict, dict | None]:
    """-> (adapters, their shardings or None). `params`: a pure dict (the frozen base weights);
    `shardings`: the same tree of NamedShardings (see `shardings`)."""
    if rank <= 0:
        raise ValueError(f"model.lora.rank={rank} must be positive to add adapters")
    chosen = set(selected(params, targets))
    adapters = {}
    for i, (path, w) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        if path_str(path) not in chosen:
            continue
        *lead, din, dout = w.shape
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, din, rank), jnp.float32) / jnp.sqrt(din)
        _set(adapters, _keys(path), {"a": a.astype(w.dtype), "b": jnp.zeros((*lead, rank, dout), w.dtype)})
    return adapters, (adapter_shardings(params, targets, shardings) if shardings is not None else None)


def adapter_shardings(params, targets: Sequence[str], shardings) -> dict:
    """NamedShardings of the adapters `init` makes: each takes the base matrix's leading and in (a)
    or out (b) axes from `shardings` (the tree of the base weights' shardings)."""
    chosen = set(selected(params, targets))
    sh_flat = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    out: dict = {}
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        s = path_str(path)
        if s not in chosen:
            continue
        base = sh_flat[s]
        spec = tuple(base.spec) + (None,) * (len(w.shape) - len(base.spec))
        _set(out, _keys(path), {"a": NamedSharding(base.mesh, P(*spec[:-1], None)),
                                "b": NamedSharding(base.mesh, P(*spec[:-2], None, spec[-1]))})
    return out


def apply(params, adapters: dict, scale: float, *, dropout: float = 0.0, rng: jax.Array | None = None):
    """`params` with every adapted matrix replaced by `W + scale * A @ B` (in W's dtype); with
    `dropout > 0` and an `rng`, rows of `A` are dropped (see the module docstring)."""
    flat_ad = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, dict) and
                                                           set(x) == {"a", "b"})[0]:
        flat_ad[path_str(path)] = leaf

    def one(path, w):
        ad = flat_ad.get(path_str(path))
        if ad is None:
            return w
        a = ad["a"].astype(jnp.float32)
        if dropout > 0 and rng is not None:
            key = jax.random.fold_in(rng, zlib.crc32(path_str(path).encode()) % (2 ** 31))
            keep = jax.random.bernoulli(key, 1 - dropout, a.shape[:-1] + (1,))
            a = jnp.where(keep, a / (1 - dropout), 0.0)
        delta = jnp.einsum("...ir,...ro->...io", a, ad["b"].astype(jnp.float32))
        return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


merge = apply  # folding adapters into the base weights for export is the same computation


def materialize(params: dict, frozen: dict, scale: float, dropout: float = 0.0, rng: jax.Array | None = None):
    """Training-state split -> model split: `(params without "lora", frozen with the adapters
    applied)`. Without a "lora" entry both pass through unchanged."""
    if "lora" not in params:
        return params, frozen
    rest = {k: v for k, v in params.items() if k != "lora"}
    return rest, apply(frozen, params["lora"], scale, dropout=dropout, rng=rng)


def count(adapters: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


def scale_of(lora_cfg: Any) -> float:
    return float(lora_cfg.alpha) / float(lora_cfg.rank)
