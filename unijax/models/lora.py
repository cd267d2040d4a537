"""LoRA adapters on selected weight matrices: `y = x W + (alpha / r) * (dropout(x) A) B`.

Adapters live beside the model, as a pure-dict tree that mirrors the parameter tree
(`{"language_model": {"layers": {0: {"self_attn": {"q_proj": {"kernel": {"a": .., "b": ..}}}}}}}`),
for every parameter whose path (`language_model/layers/0/self_attn/q_proj/kernel`) matches one
of `model.lora.targets` (regexes, `re.fullmatch`). The last two axes of a selected array are its
(in, out) matrix; leading axes (stacked experts `[E, in, out]`, scanned layers `[L, in, out]`)
get one adapter each, so every expert has its own. `a [..., in, r]` starts N(0, 1/in) and
`b [..., r, out]` at zero, so a fresh adapter changes nothing.

Training uses the *activation form* (`attach`): the frozen weight's value in the merged model
becomes an `Adapted(w, a, b, ...)`, and the layers that own adaptable weights (`Linear` for the
attention projections, dense FFNs and the shared expert; `Experts` for the stacked experts, in
both dispatches) compute `x W + s (dropout(x) A) B` through `matmul` / `einsum` / `ragged_dot`:
no `[in, out]` product, gradient or merged copy exists in the step, only rank-r activations.
Dropout is PEFT's `lora_dropout`: an element-wise mask on the adapter's input, per token. A
weight that no such layer consumes (an embedding table, a convolution) falls back to the
weight-level form `W + s A B` (`apply`, dropout then masks rows of `A`: one mask per step).

`merge` (= `apply`) folds the adapters into the weights for export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unijax.sharding import target_platform

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


def flat_adapters(adapters: dict) -> dict[str, dict]:
    """`{path: {"a": .., "b": ..}}` of an adapter tree."""
    leaves = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, dict) and set(x) == {"a", "b"})
    return {path_str(path): leaf for path, leaf in leaves[0]}


def _path_key(rng: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(rng, zlib.crc32(path.encode()) % (2 ** 31))


def _merged_one(path: str, w, ad: dict, scale: float, dropout: float, rng):
    a = ad["a"].astype(jnp.float32)
    if dropout > 0 and rng is not None:
        keep = jax.random.bernoulli(_path_key(rng, path), 1 - dropout, a.shape[:-1] + (1,))
        a = jnp.where(keep, a / (1 - dropout), 0.0)
    delta = jnp.einsum("...ir,...ro->...io", a, ad["b"].astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def apply(params, adapters: dict, scale: float, *, dropout: float = 0.0, rng: jax.Array | None = None):
    """`params` with every adapted matrix replaced by `W + scale * A @ B` (in W's dtype): the
    weight-level form (export, and weights no adapter-aware layer consumes); with `dropout > 0`
    and an `rng`, rows of `A` are dropped (one mask per step)."""
    flat_ad = flat_adapters(adapters)

    def one(path, w):
        s = path_str(path)
        return w if s not in flat_ad else _merged_one(s, w, flat_ad[s], scale, dropout, rng)

    return jax.tree_util.tree_map_with_path(one, params)


merge = apply  # folding adapters into the base weights for export is the same computation


def materialize(params: dict, frozen: dict, scale: float, dropout: float = 0.0, rng: jax.Array | None = None):
    """Training-state split -> model split in the weight-level form: `(params without "lora", frozen
    with the adapters merged)` (export). Without a "lora" entry both pass through unchanged."""
    if "lora" not in params:
        return params, frozen
    rest = {k: v for k, v in params.items() if k != "lora"}
    return rest, apply(frozen, params["lora"], scale, dropout=dropout, rng=rng)


# -- the activation form ---------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A frozen matrix `w [..., in, out]` with its adapter `a [..., in, r]`, `b [..., r, out]`, as an
    adapter-aware layer receives it; `key [..., 2]` (uint32, one per leading index; None = no
    dropout) draws the per-token dropout mask. Leading axes are sliced like the weight's (a
    scanned layer sees its own slice)."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    key: jax.Array | None
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def __getitem__(self, index):
        """`param[...]` from a layer that is not adapter-aware: the merged weight (weight-level form)."""
        delta = jnp.einsum("...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (self.w.astype(jnp.float32) + self.scale * delta).astype(self.w.dtype)[index]


def _dropped(x: jax.Array, w: Adapted) -> jax.Array:
    """PEFT's `lora_dropout` on the adapter's input: an element-wise mask, scaled by 1 / (1 - p)."""
    if w.dropout <= 0 or w.key is None:
        return x
    keep = jax.random.bernoulli(w.key.reshape(-1, 2)[0], 1 - w.dropout, x.shape)
    return jnp.where(keep, x / (1 - w.dropout), 0).astype(x.dtype)


def matmul(x: jax.Array, w, dtype) -> jax.Array:
    """`x [..., in] @ w [in, out]` in `dtype`, plus the adapter path when `w` is `Adapted`."""
    x = x.astype(dtype)
    if not isinstance(w, Adapted):
        return x @ w.astype(dtype)
    h = (_dropped(x, w) @ w.a.astype(dtype)) * jnp.asarray(w.scale, dtype)
    return x @ w.w.astype(dtype) + h @ w.b.astype(dtype)


def einsum(spec: str, x: jax.Array, w, dtype) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in `dtype` for a two-operand `spec` whose second operand ends in its
    (in, out) axes (`"gxce,xem->gxcm"`), plus the adapter path when `w` is `Adapted`: `a` contracts
    the `in` axis into a rank axis, `b` maps it to `out`, each leading index (expert) its own pair."""
    x = x.astype(dtype)
    if not isinstance(w, Adapted):
        return jnp.einsum(spec, x, w.astype(dtype))
    ins, out = spec.split("->")
    lhs, rhs = ins.split(",")
    r = next(c for c in "rzyqjklnopuvw" if c not in spec)
    mid = out.replace(rhs[-1], r)
    h = jnp.einsum(f"{lhs},{rhs[:-1]}{r}->{mid}", _dropped(x, w), w.a.astype(dtype)) * jnp.asarray(w.scale, dtype)
    return jnp.einsum(spec, x, w.w.astype(dtype)) + jnp.einsum(f"{mid},{rhs[:-2]}{r}{rhs[-1]}->{out}", h,
                                                                w.b.astype(dtype))


# -- grouped matmuls (the dropless MoE's expert FFN) --------------------------------------------------
# Which kernel `grouped_matmul` uses: "auto" (megablox on TPU, as traced for: `sharding.target_platform`;
# `jax.lax.ragged_dot` elsewhere) | "ragged_dot" | "megablox" | "megablox_interpret" (the Pallas kernel in
# interpret mode: CPU tests). Megablox is a Mosaic kernel: under a mesh it must run inside `shard_map`.
GMM_BACKEND = "auto"
GMM_MAX_TILE = (512, 512, 512)  # largest (rows, in, out) tiles megablox gets


def gmm_backend() -> str:
    if GMM_BACKEND != "auto":
        return GMM_BACKEND
    return "megablox" if target_platform() == "tpu" else "ragged_dot"


def _tile(d: int, cap: int) -> int | None:
    """A megablox tile for a dimension of size d: the whole dimension when it fits (a block equal to
    the array's dimension is always legal for Mosaic), else the largest of cap/512/256/128 dividing d."""
    if d <= cap:
        return d
    return next((t for t in (cap, 512, 256, 128) if t <= cap and d % t == 0), None)


def _rows_in_groups(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Megablox leaves rows past the last group uninitialised: zero them (ragged_dot's contract)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (out.shape[0], 1), 0)
    return jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))


def _megablox_module():
    """`jax.experimental.pallas.ops.tpu.megablox.gmm`, the module (the package re-exports its `gmm` op under that name)."""
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _kernel_precision(x, w):
    """The matmul precision the kernel's dots are traced with: Mosaic rejects bfloat16 operands at
    `highest` ("Bad lhs type"), which is exact for them anyway (bf16 products, f32 accumulation), so
    bf16 x bf16 traces at `default`; float32 keeps the configured precision."""
    if x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16:
        return jax.default_matmul_precision("default")
    return contextlib.nullcontext()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _megablox(x, w, group_sizes, tiling, interpret):
    return _megablox_fwd(x, w, group_sizes, tiling, interpret)[0]


def _megablox_fwd(x, w, group_sizes, tiling, interpret):
    mb = _megablox_module()
    with _kernel_precision(x, w):
        out = mb.gmm(x, w, group_sizes, x.dtype, tiling, interpret=interpret)
    return _rows_in_groups(out, group_sizes), (x, w, group_sizes)


def _megablox_bwd(tiling, interpret, res, g):
    """megablox's own VJP, but with the tiles of each product's own (rows, in, out) dims (its VJP
    reuses the forward's `(tm, tk, tn)` for the transposed product, illegal where in != out tiles)
    and the input gradient's rows past the groups zeroed (they feed a gather's transpose)."""
    mb = _megablox_module()
    x, w, group_sizes = res
    tm, tk, tn = tiling
    with _kernel_precision(x, w):
        dx = mb.gmm(g, w, group_sizes, x.dtype, (tm, tn, tk), transpose_rhs=True, interpret=interpret)
        dw = mb.tgmm(x.swapaxes(0, 1), g, group_sizes, w.dtype, tiling, num_actual_groups=w.shape[0],
                     interpret=interpret)
    return _rows_in_groups(dx, group_sizes), dw, None


_megablox.defvjp(_megablox_fwd, _megablox_bwd)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def megablox_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, interpret: bool = False) -> jax.Array:
    """`ragged_dot(x [m, k], w [G, k, n], group_sizes [G])` with megablox's `gmm` (weight gradient by
    its `tgmm`, grouped too). Megablox needs m a multiple of the row tile, and in/out tiles that divide
    k/n and are multiples of 128 (or the whole dimension): rows are padded to the row tile (at most
    `GMM_MAX_TILE[0]`, a multiple of 8), k/n over the max tile that no 128-multiple tile divides are
    zero-padded to a multiple of 128. bfloat16 or float32 only."""
    m, k = x.shape
    n = w.shape[-1]
    cap_m, cap_k, cap_n = GMM_MAX_TILE
    kp = k if _tile(k, cap_k) else -(-k // 128) * 128
    np_ = n if _tile(n, cap_n) else -(-n // 128) * 128
    tm = min(cap_m, -(-m // 8) * 8)
    mp = -(-m // tm) * tm
    tiling = (tm, _tile(kp, cap_k), _tile(np_, cap_n))
    xp = _pad_to(_pad_to(x, 0, mp), 1, kp)
    wp = _pad_to(_pad_to(w, 1, kp), 2, np_)
    out = _megablox(xp, wp, group_sizes.astype(jnp.int32), tiling, interpret)
    return out[:m, :n]


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`x [m, k]` rows grouped by `group_sizes [G]` (group g: the next `group_sizes[g]` rows) times
    `w [G, k, n]` -> `[m, n]`, rows past the groups 0; the kernel is `gmm_backend()`'s."""
    backend = gmm_backend()
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if backend not in ("megablox", "megablox_interpret"):
        raise ValueError(f"lora.GMM_BACKEND={GMM_BACKEND!r} is not auto|ragged_dot|megablox|megablox_interpret")
    return megablox_gmm(x, w, group_sizes, interpret=backend == "megablox_interpret")


def ragged_dot(x: jax.Array, w, group_sizes: jax.Array, dtype) -> jax.Array:
    """`grouped_matmul(x, w, group_sizes)` (rows grouped by expert) in `dtype` plus, for `Adapted`,
    each group's own adapter through the same grouped matmul (`(dropout(x) A_g) B_g`: rank-r
    activations, no `[in, out]` product)."""
    x = x.astype(dtype)
    if not isinstance(w, Adapted):
        return grouped_matmul(x, w.astype(dtype), group_sizes)
    h = grouped_matmul(_dropped(x, w), w.a.astype(dtype), group_sizes) * jnp.asarray(w.scale, dtype)
    return grouped_matmul(x, w.w.astype(dtype), group_sizes) + grouped_matmul(h, w.b.astype(dtype), group_sizes)


def attach(model: nnx.Module, adapters: dict, scale: float, dropout: float = 0.0,
           rng: jax.Array | None = None) -> nnx.Module:
    """Puts the adapters into a merged training model, in place: a module that declares adapter-aware
    weights (class attribute `lora_weights`, names of its Params) gets `Adapted` values for them;
    any other adapted weight is merged at the weight level (`apply`). Returns `model`."""
    flat_ad = flat_adapters(adapters)
    done = set()
    for path, node in nnx.iter_graph(model):
        for name in getattr(type(node), "lora_weights", ()):
            s = path_str((*path, name))
            if s not in flat_ad:
                continue
            param = getattr(node, name)
            w = param.get_value()
            key = None
            if dropout > 0 and rng is not None:
                lead = w.shape[:-2]
                key = jax.random.split(_path_key(rng, s), math.prod(lead)).reshape(*lead, 2)
            param.set_value(Adapted(w, flat_ad[s]["a"], flat_ad[s]["b"], key, float(scale), float(dropout)))
            done.add(s)
    for path, node in nnx.iter_graph(model):
        s = path_str(path)
        if isinstance(node, nnx.Variable) and s in flat_ad and s not in done:
            node.set_value(_merged_one(s, node.get_value(), flat_ad[s], scale, dropout, rng))
    return model


def count(adapters: dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


def scale_of(lora_cfg: Any) -> float:
    return float(lora_cfg.alpha) / float(lora_cfg.rank)
