"""Shared layers: linear/embedding with logical axes, norms, RoPE, attention, SwiGLU.

Every parameter is created with `out_sharding` metadata holding *logical* axis names
(`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, ...); `unijax.sharding` maps them onto mesh axes
through the rules table of the config, so the model code never names a mesh axis.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from unijax import sharding
from unijax.models import lora
from unijax.models.config import AIA_IMPLS, ATTENTION_IMPLS

Array = jax.Array

NEG_INF = -1e30  # finite mask value: a fully masked row (padding query) stays finite


def dtype_of(name: str):
    return jnp.dtype(name)


class Linear(nnx.Module):
    """`x @ kernel (+ bias)` in `dtype`, kernel `[din, dout]` and bias carrying logical axis names;
    the parameters, their initialisation and random streams are `nnx.Linear`'s. Adapter-aware: a
    kernel holding a `lora.Adapted` adds its LoRA path in activation form (`unijax.models.lora`)."""

    lora_weights = ("kernel",)

    def __init__(self, din: int, dout: int, axes: Sequence[str | None], *, rngs: nnx.Rngs, bias: bool = False,
                 dtype="float32", param_dtype="float32", std: float = 0.02):
        pd = dtype_of(param_dtype)
        self.dtype = dtype_of(dtype)
        self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (din, dout), pd), out_sharding=tuple(axes))
        self.bias = (nnx.Param(nnx.initializers.zeros(rngs.params(), (dout,), pd), out_sharding=(axes[-1],)) if bias
                     else nnx.data(None))

    def __call__(self, x: Array) -> Array:
        y = lora.matmul(x, self.kernel.get_value(), self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def linear(din: int, dout: int, axes: Sequence[str | None], *, rngs: nnx.Rngs, bias: bool = False,
           dtype="float32", param_dtype="float32", std: float = 0.02) -> Linear:
    """A `Linear` whose kernel starts normal(0, `std`) (transformers' `initializer_range`)."""
    return Linear(din, dout, axes, rngs=rngs, bias=bias, dtype=dtype, param_dtype=param_dtype, std=std)


def embed(num: int, features: int, axes: Sequence[str | None], *, rngs: nnx.Rngs, dtype="float32",
          param_dtype="float32", std: float = 0.02) -> nnx.Embed:
    return nnx.Embed(num, features, dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype), rngs=rngs,
                     embedding_init=nnx.initializers.normal(std),
                     embedding_metadata={"out_sharding": tuple(axes)})


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32",
               axis_name: str = "embed") -> nnx.LayerNorm:
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype),
                         rngs=rngs, scale_metadata={"out_sharding": (axis_name,)},
                         bias_metadata={"out_sharding": (axis_name,)})


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as transformers' `ACT2FN['gelu']`."""
    return jax.nn.gelu(x, approximate=False)


def fill_in_order(mask: Array, values: Array, base: Array) -> Array:
    """`base [B, T, ...]` with its `mask [B, T]` slots replaced, in order, by `values [B, N, ...]`
    (the k-th masked slot of a row gets that row's k-th value; a gather, jit-safe)."""
    slot = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, values.shape[1] - 1)
    extra = (1,) * (values.ndim - 2)
    got = jnp.take_along_axis(values, slot.reshape(slot.shape + extra), axis=1)
    return jnp.where(mask.reshape(mask.shape + extra), got, base)


class RMSNorm(nnx.Module):
    """`w * (x / sqrt(mean(x^2) + eps))`, statistics in float32, result in the input dtype (as LLaMA)."""

    def __init__(self, features: int, eps: float, *, param_dtype="float32"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), dtype_of(param_dtype)), out_sharding=("embed",))

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * xf.astype(dtype)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables `[batch, seq, head_dim]` for integer `positions [batch, seq]` (float32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE on `x [batch, seq, heads, head_dim]`: `x cos + rotate_half(x) sin`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask(q_segment: Array, kv_segment: Array, q_slot: Array, kv_slot: Array) -> Array:
    """Boolean `[batch, q, kv]`: same non-zero segment and causal by slot (kv_slot <= q_slot).

    Segment id 0 marks padding (and unwritten cache slots); packing gives each sequence its own id.
    """
    same_segment = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] > 0)
    return same_segment & (kv_slot[None, :] <= q_slot[:, None])


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float) -> Array:
    """Softmax attention with grouped-query heads.

    q `[B, T, H, D]`, k/v `[B, K, S, D]` (heads-major, so both contractions have their batch dims
    (B, K) leading and a large cache is never transposed), `H = K * G`, mask `[B, T, S]` (True =
    attend). Scores and softmax in float32; returns `[B, T, H, D]` in v's dtype.
    """
    return _weighted_values(attention_probs(q, k, mask, scale), v)


def attention_probs(q: Array, k: Array, mask: Array | None, scale: float) -> Array:
    """The softmax probabilities of `dot_product_attention`, float32 `[B, K, G, T, S]`."""
    b, t, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def _weighted_values(probs: Array, v: Array) -> Array:
    """probs `[B, K, G, T, S]`, v `[B, K, S, Dv]` -> `[B, T, K * G, Dv]` in v's dtype."""
    b, kh, g, t, _ = probs.shape
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, v.shape[-1])


CHUNK = 256  # query block of the chunked implementation


def _pad_last(x: Array, n: int) -> Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n)]) if n else x


def _chunked_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float, chunk: int) -> Array:
    """The explicit softmax one query block at a time, each block rematerialised in the backward
    pass: `O(chunk x S)` live scores instead of `O(T x S)`; the same numbers as the explicit path."""
    b, t, h, d = q.shape
    if t <= chunk:  # one block: the explicit path as it is
        return dot_product_attention(q, k, v, mask, scale)
    n = -(-t // chunk)
    pad = n * chunk - t
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)
    if mask is None:
        mask = jnp.ones((b, t, k.shape[2]), bool)
    mb = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, -1).swapaxes(0, 1)

    @jax.checkpoint
    def block(args):
        qc, mc = args
        return dot_product_attention(qc, k, v, mc, scale)

    out = jax.lax.map(block, (qb, mb))                        # [n, B, chunk, H, Dv]
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, -1)[:, :t]


_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_log = logging.getLogger(__name__)


def resolve_attention_impl(impl: str) -> str:
    """`model.attention_impl` -> the kernel to trace: `auto` reads `sharding.target_platform()` (call it
    at trace time: a TPU topology's mesh resolves to the TPU kernel on a CPU host): `tpu` -> `splash`,
    a GPU -> `cudnn`, anything else -> `xla`; a named kernel is returned as it is. The kernels
    themselves fall back to `xla` where they do not apply (see `_cudnn_attention`, `_splash_attention`)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={impl!r} is not one of {'|'.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    platform = sharding.target_platform()
    if platform == "tpu":
        return "splash"
    return "cudnn" if platform in _GPU_PLATFORMS else "xla"


def _cudnn_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float,
                     segment_ids: Array | None = None) -> Array:
    """cuDNN's fused flash attention, `jax.nn.dot_product_attention(..., implementation="cudnn")`.

    What jax 0.10's cuDNN path takes: q/k/v in `[B, T, N, H]` (GQA by `N % K == 0`), dtype fp16/bf16
    (fp8 separately) and all three the same; equal q/k head dims, a multiple of 8 and <= 256 on
    Hopper+ (128 before); `mask=` a boolean `[B|1, N|1, T, S]`, which jax turns into an additive
    bias (a large negative in q's dtype), so any mask works (packed segments, padding, a decoding
    cache) at the price of a dense `[B, 1, T, S]` bias in memory (and its gradient buffer in the
    backward: jax always exports dbias); `is_causal` (top-left aligned, so only for self-attention
    without a cache); `query_seq_lengths`/`key_value_seq_lengths` describe tail padding only, and
    cuDNN's packed layout (`q_offsets`/`kv_offsets`) is not exposed by `jax.nn.dot_product_attention`,
    hence the mask. Here: head dims are zero-padded to a common multiple of 8 (no change to the
    scores: the scale is passed explicitly; v's padded channels are sliced off), the mask goes in as
    `mask=` and, with `segment_ids` (self-attention, no cache: the mask is then causal), `is_causal`
    lets cuDNN skip the blocks above the diagonal.

    Falls back to the explicit XLA path (`dot_product_attention`, the numbers of `impl="xla"`):
    off a CUDA GPU (the target platform is not a GPU, or is ROCm: there is no cuDNN); for float32
    (or any non-fp16/bf16) q, as cuDNN computes in fp16/bf16 only (a bf16 model's q/k/v are bf16
    already; k/v are cast to q's dtype); and where jax's cuDNN checks reject the shapes at trace
    time (`NotImplementedError`, e.g. a head dim over 256/128; logged).
    """
    platform = sharding.target_platform()
    if platform not in ("gpu", "cuda") or q.dtype not in (jnp.bfloat16, jnp.float16):
        return dot_product_attention(q, k, v, mask, scale)
    dv = v.shape[-1]
    dim = -(-max(q.shape[-1], dv) // 8) * 8
    qp = _pad_last(q, dim - q.shape[-1])
    kp = _pad_last(k.astype(q.dtype), dim - k.shape[-1]).transpose(0, 2, 1, 3)   # -> [B, S, K, D]
    vp = _pad_last(v.astype(q.dtype), dim - dv).transpose(0, 2, 1, 3)
    causal = segment_ids is not None and q.shape[1] == k.shape[2]
    try:
        out = jax.nn.dot_product_attention(qp, kp, vp, mask=None if mask is None else mask[:, None], scale=scale,
                                           is_causal=causal, implementation="cudnn")
    except (NotImplementedError, RuntimeError) as e:  # shape/arch/cuDNN checks run at trace time
        _log.warning("attention_impl=cudnn: cuDNN does not take this call (%s); using the XLA path", e)
        return dot_product_attention(q, k, v, mask, scale)
    return out[..., :dv].astype(v.dtype)


SPLASH_INTERPRET = False
"""Off TPU, run `impl="splash"` through the Pallas interpreter (`interpret=True`) instead of falling
back to `xla`: for tests on CPU. On TPU (the target platform, `sharding.target_platform()`) the
compiled kernel always runs."""

_LANES = 128  # splash tiles: sequence blocks and (padded) head dims are multiples of the lane width


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """A causal splash-attention kernel for `heads` query heads over `length` (a multiple of `block`)
    tokens, block sizes `block` everywhere (forward, dq and dkv). Built per trace (its block-mask
    tables become constants of that trace); the numpy mask processing behind it is cached by jax."""
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array, segment_ids: Array, scale: float, interpret: bool) -> Array:
    """`_splash_attention` on one shard: q `[B, T, H, D]`, k/v `[B, K, T, D]`, segment_ids `[B, T]`."""
    b, t, h, d = q.shape
    dv = v.shape[-1]
    tp = -(-t // _LANES) * _LANES
    block = next(bs for bs in (512, 256, 128) if tp % bs == 0)
    dqk, dvp = -(-d // _LANES) * _LANES, -(-dv // _LANES) * _LANES
    pad_t = tp - t
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)                     # [B, H, T, D], pre-scaled
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pad_t), (0, dqk - d)))
    kp = jnp.pad(k.astype(q.dtype), ((0, 0), (0, 0), (0, pad_t), (0, dqk - d)))
    vp = jnp.pad(v.astype(q.dtype), ((0, 0), (0, 0), (0, pad_t), (0, dvp - dv)))
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad_t)))              # padding: segment 0
    kernel = _splash_kernel(h, tp, block, interpret)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(qh, kp, vp, seg)
    return out[:, :, :t, :dv].transpose(0, 2, 1, 3).astype(v.dtype)


def _splash_attention(q: Array, k: Array, v: Array, scale: float, segment_ids: Array) -> Array:
    """Causal self-attention within segments by the Pallas TPU splash-attention kernel
    (`jax.experimental.pallas.ops.tpu.splash_attention`): the mask is `CausalMask` and'ed with
    `SegmentIds(segment_ids, segment_ids)`, i.e. `attention_mask(seg, seg, arange, arange)` for
    every real query (a padding query, segment 0, attends the earlier padding keys instead of
    nothing: finite, and never read by a real query).

    q `[B, T, H, D]`, k/v `[B, K, T, D]` (T == S: no cache). GQA runs natively: `make_splash_mha`
    takes `K` kv heads for `H = K * G` query heads (head `h` reads kv head `h // G`, no repeated
    k/v; the dkv kernel sums each group's gradient in its scratch). Splash has no scale argument:
    q is pre-scaled (in q's dtype). Its tiles want multiples of 128: head dims are zero-padded to
    multiples of 128 (q/k: no change to the scores; v: zero channels, sliced off; the AIA indicator
    channel rides in one of them) and the sequence to a multiple of 128 with segment id 0; blocks
    are 512, 256 or 128, the largest dividing the padded length. Under a mesh the kernel runs in a
    `shard_map`: rows over the batch axes, heads over `tensor` where both H and K divide (so not
    inside another `shard_map` over those axes). bf16 operands need the default matmul precision:
    Mosaic rejects fp32 contract precision (`jax_default_matmul_precision=highest`) on bf16.
    """
    interpret = sharding.target_platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    run = functools.partial(_splash_local, scale=scale, interpret=interpret)
    if mesh.empty:
        return run(q, k, v, segment_ids)
    b, _, h, _ = q.shape
    batch = sharding.logical_to_spec(("activation_batch",), (b,), mesh)[0]
    heads = sharding.logical_to_spec(("activation_heads",), (h,), mesh)[0]
    if heads != sharding.logical_to_spec(("activation_kv_heads",), (k.shape[1],), mesh)[0]:
        heads = None
    qs, kvs = P(batch, None, heads, None), P(batch, heads, None, None)
    return jax.shard_map(run, in_specs=(qs, kvs, kvs, P(batch, None)), out_specs=qs, check_vma=False)(
        q, k, v, segment_ids)


def attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float, impl: str = "xla",
              aia_keys: Array | None = None, aia_impl: str = "lean",
              segment_ids: Array | None = None) -> tuple[Array, Array | None]:
    """Grouped-query attention by `impl` (`xla`: explicit softmax; `chunked`: the same by query
    blocks, O(T) memory; `cudnn`: cuDNN's fused kernel on a GPU (`_cudnn_attention`); `splash`: the
    Pallas TPU kernel (`_splash_attention`); `auto`: by the target platform,
    `resolve_attention_impl`), optionally with the AIA mass.

    `segment_ids [B, T]` (segment 0 = padding) says that `mask` is
    `attention_mask(segment_ids, segment_ids, arange, arange)` (self-attention without a cache):
    only then can `splash` run, as the kernel builds that mask from the ids; without them (a KV
    cache, decoding, or a caller with only a dense mask) `splash` falls back to `xla`. Off TPU,
    `splash` also falls back to `xla` unless `SPLASH_INTERPRET` (tests) runs it interpreted.

    `aia_keys [B, S]` (bool) selects keys; the second output is then, per query and head, the
    attention mass on them, `[B, T, H]` float32 (else None). `aia_impl="lean"` appends to v a
    channel that is 1 on the selected keys: that output channel *is* the mass, computed inside
    whichever kernel runs (O(sequence) memory with a fused one), and its ordinary backward is the
    exact gradient. `aia_impl="explicit"` sums the explicit probabilities (the reference; needs
    `impl="xla"`, or `auto`, which it then resolves to the explicit XLA path).
    """
    if aia_keys is not None and aia_impl == "explicit":
        if impl not in ("xla", "auto"):
            raise ValueError(f"explicit AIA needs model.attention_impl='xla' or 'auto' (got {impl!r}); use the lean path")
        impl = "xla"
    impl = resolve_attention_impl(impl)
    if impl == "splash" and (segment_ids is None or q.shape[1] != k.shape[2]
                             or (sharding.target_platform() != "tpu" and not SPLASH_INTERPRET)):
        impl = "xla"
    run = {"xla": dot_product_attention,
           "cudnn": lambda q, k, v, mask, scale: _cudnn_attention(q, k, v, mask, scale, segment_ids),
           "splash": lambda q, k, v, mask, scale: _splash_attention(q, k, v, scale, segment_ids),
           "chunked": lambda *a: _chunked_attention(*a, chunk=CHUNK)}[impl]
    if aia_keys is None:
        return run(q, k, v, mask, scale), None
    d = v.shape[-1]
    if aia_impl == "explicit":
        probs = attention_probs(q, k, mask, scale)
        b, t, h, _ = q.shape
        mass = jnp.einsum("bkgts,bs->btkg", probs, aia_keys.astype(jnp.float32)).reshape(b, t, h)
        return _weighted_values(probs, v), mass
    if aia_impl != "lean":
        raise ValueError(f"aia_impl={aia_impl!r}: expected one of {AIA_IMPLS}")
    indicator = jnp.broadcast_to(aia_keys[:, None, :, None].astype(v.dtype), (*v.shape[:3], 1))
    out = run(q, k, jnp.concatenate([v, indicator], axis=-1), mask, scale)
    return out[..., :d], out[..., d].astype(jnp.float32)


class Attention(nnx.Module):
    """LLaMA self-attention: q/k/v projections, RoPE, grouped-query attention, output projection.

    With `aia_keys` (`[batch, keys]` bool) a third output holds the attention mass every query and
    head puts on those keys, `[batch, seq, heads]` (see `attention`).

    With a layer cache `(k, v)` of `[batch, kv_heads, cache_len, head_dim]`, the new keys/values are
    first written at `cache_index`, then the queries attend over the whole cache under `mask`
    (`[batch, seq, cache_len]`). Writing before reading lets XLA update a loop-carried cache in
    place. Returns the output and the (updated cache, or the new tokens') keys/values.

    `segment_ids [batch, seq]` (the ids `mask` was built from; read only without a cache) let a
    kernel that builds its own mask (`splash`) run; `cfg.attention_impl` is resolved at trace time
    (`resolve_attention_impl`).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        t = cfg.text
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.theta = t.rope_theta
        self.impl = cfg.attention_impl
        kw = dict(rngs=rngs, bias=t.attention_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=t.initializer_range)
        self.q_proj = linear(t.hidden_size, t.num_heads * t.head_dim, ("embed", "heads"), **kw)
        self.k_proj = linear(t.hidden_size, t.num_kv_heads * t.head_dim, ("embed", "kv_heads"), **kw)
        self.v_proj = linear(t.hidden_size, t.num_kv_heads * t.head_dim, ("embed", "kv_heads"), **kw)
        self.o_proj = linear(t.num_heads * t.head_dim, t.hidden_size, ("heads", "embed"), **kw)

    def __call__(self, x: Array, positions: Array, mask: Array, cache=None, cache_index=None,
                 aia_keys: Array | None = None, aia_impl: str = "lean", segment_ids: Array | None = None):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # heads-major [B, K, S, D]
        if cache is not None:
            at = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        out, mass = attention(q, k, v, mask, 1.0 / math.sqrt(self.head_dim), self.impl, aia_keys, aia_impl,
                              segment_ids if cache is None else None)
        out = self.o_proj(out.reshape(b, s, -1))
        return (out, (k, v)) if aia_keys is None else (out, (k, v), mass)


class SwiGLU(nnx.Module):
    """`down(silu(gate(x)) * up(x))` (LLaMA MLP)."""

    def __init__(self, hidden: int, inner: int, *, rngs: nnx.Rngs, bias: bool = False, dtype="float32",
                 param_dtype="float32", std: float = 0.02):
        kw = dict(rngs=rngs, bias=bias, dtype=dtype, param_dtype=param_dtype, std=std)
        self.gate_proj = linear(hidden, inner, ("embed", "mlp"), **kw)
        self.up_proj = linear(hidden, inner, ("embed", "mlp"), **kw)
        self.down_proj = linear(inner, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
