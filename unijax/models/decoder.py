"""LLaMA decoder stack with an optional layer scan, remat, and a static-shape KV cache.

Under a mesh the residual stream, and the attention and FFN outputs added to it, are pinned to
`unijax.sharding.RESIDUAL` (rows over the batch axes, embed replicated): the partitioner does not
infer the activations' layout from the fsdp-sharded weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from unijax.models.config import REMAT_POLICIES
from unijax.models.layers import Attention, RMSNorm, SwiGLU, attention_mask, embed
from unijax.models.moe import TAMoE
from unijax.sharding import RESIDUAL, constrain

Array = jax.Array

# model.remat_policy (`unijax.models.config.REMAT_POLICIES`, in order) -> jax checkpoint policy
_CHECKPOINT_POLICIES = dict(zip(REMAT_POLICIES, (None, jax.checkpoint_policies.nothing_saveable,
                                                 jax.checkpoint_policies.checkpoint_dots,
                                                 jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Static-shape decoding cache.

    k, v: per layer `[batch, kv_heads, cache_len, head_dim]` (heads-major): a tuple of per-layer
    arrays, or one stacked `[layers, ...]` array for a scanned decoder. Separate arrays matter on
    CPU, where slicing a layer out of a stacked buffer copies it. segment: `[batch, cache_len]`
    (0 = empty or padding, else the row's sequence id); index: next slot to write (scalar).
    """

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]
    segment: Array
    index: Array

    @classmethod
    def init(cls, cfg, batch: int, length: int, dtype=None) -> KVCache:
        t = cfg.text
        shape = (batch, t.num_kv_heads, length, t.head_dim)
        dtype = dtype or jnp.dtype(cfg.dtype)
        if cfg.scan_layers:
            k = v = jnp.zeros((t.num_layers, *shape), dtype)
        else:
            k = v = tuple(jnp.zeros(shape, dtype) for _ in range(t.num_layers))
        return cls(k=k, v=v, segment=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.segment.shape[1]


class DecoderLayer(nnx.Module):
    """Pre-norm attention + FFN; the FFN is a SwiGLU, or a TA-MoE when `cfg.ffn == "ta_moe"` selects
    this layer (`moe.layers`)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, index: int = 0):
        t = cfg.text
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=cfg.param_dtype)
        if cfg.ffn == "ta_moe" and cfg.moe.is_moe_layer(index):
            self.mlp = TAMoE(cfg, rngs=rngs)
        else:
            self.mlp = SwiGLU(t.hidden_size, t.intermediate_size, rngs=rngs, bias=t.mlp_bias, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, std=t.initializer_range)

    def __call__(self, x, positions, mask, cache=None, cache_index=None, task=None, valid=None, aia_keys=None,
                 aia_impl="lean", segment_ids=None):
        """-> (x, (k, v), aux): aux is the TA-MoE's dict ({} for a dense FFN), plus `aia` (`[batch,
        seq]`: each query's attention mass on `aia_keys`, averaged over heads) when `aia_keys` is given.
        `segment_ids` (no cache: `mask` is built from them) let a fused kernel build the mask itself."""
        x = constrain(x, RESIDUAL)
        out = self.self_attn(self.input_layernorm(x), positions, mask, cache, cache_index, aia_keys, aia_impl,
                             segment_ids)
        h, kv = out[:2]
        x = constrain(x + constrain(h, RESIDUAL), RESIDUAL)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, TAMoE):
            h, aux = self.mlp(h, task, valid, exact=cache is not None)
        else:
            h, aux = self.mlp(h), {}
        if aia_keys is not None:
            aux = dict(aux, aia=jnp.mean(out[2], axis=-1))
        return constrain(x + constrain(h, RESIDUAL), RESIDUAL), kv, aux


class Decoder(nnx.Module):
    """Token embedding table, `num_layers` decoder layers, final RMSNorm.

    With `cfg.scan_layers` the layers are one stacked module (leading logical axis `layers`)
    run by `jax.lax.scan`, which keeps compile time flat in depth.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        t = cfg.text
        self.cfg = cfg
        self.embed_tokens = embed(t.vocab_size, t.hidden_size, ("vocab", "embed"), rngs=rngs, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, std=t.initializer_range)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=t.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return DecoderLayer(cfg, rngs=r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, index=i) for i in range(t.num_layers)])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=cfg.param_dtype)

    def __call__(self, x: Array, positions: Array, segment_ids: Array, cache: KVCache | None = None,
                 task: Array | None = None, aia_keys: Array | None = None, aia_impl: str = "lean"):
        """Runs the stack on input embeddings.

        x `[batch, seq, embed]`, positions/segment_ids `[batch, seq]` (segment 0 = padding). The new
        tokens attend causally within their segment; with a cache, their keys/values are written
        at `cache.index` (in place when the cache is donated or loop-carried) and they attend to
        every earlier written slot of their row. `task [batch, seq]` (0 MMU, 1 T2I) is read by
        TA-MoE layers that route by label. Returns (hidden `[batch, seq, embed]`, cache, aux): aux
        stacks the TA-MoE layers' auxiliaries on a leading layer axis ({} for a dense model) and, with
        `aia_keys [batch, seq]` (the keys whose attention mass AIA measures), `aia [layers, batch,
        seq]`: every query's mass on those keys, averaged over heads (`unijax.training.aia`).
        """
        seq = x.shape[1]
        if cache is None:
            slots = jnp.arange(seq)
            mask = attention_mask(segment_ids, segment_ids, slots, slots)
            index, segment = None, None
        else:
            index = cache.index
            segment = jax.lax.dynamic_update_slice(cache.segment, segment_ids.astype(jnp.int32), (0, index))
            mask = attention_mask(segment_ids, segment, index + jnp.arange(seq), jnp.arange(cache.length))

        valid = segment_ids > 0
        kernel_segments = segment_ids if cache is None else None  # splash attention builds its mask from these

        def run(layer, h, layer_cache):
            return layer(h, positions, mask, layer_cache, index, task, valid, aia_keys, aia_impl, kernel_segments)

        if self.cfg.remat_policy != "none":
            run = nnx.remat(run, policy=_CHECKPOINT_POLICIES[self.cfg.remat_policy])

        x = constrain(x.astype(jnp.dtype(self.cfg.dtype)), RESIDUAL)
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(h, xs):
                layer_state, layer_cache = xs
                h, kv, aux = run(nnx.merge(graphdef, layer_state), h, layer_cache)
                return h, (kv, aux)

            x, ((new_k, new_v), aux) = jax.lax.scan(body, x, (state, None if cache is None else (cache.k, cache.v)))
        else:
            new_k, new_v, auxes, masses = [], [], [], []
            for i, layer in enumerate(self.layers):
                x, (k, v), a = run(layer, x, None if cache is None else (cache.k[i], cache.v[i]))
                new_k.append(k)
                new_v.append(v)
                if "aia" in a:
                    masses.append(a.pop("aia"))
                if a:
                    auxes.append(a)
            new_k, new_v = tuple(new_k), tuple(new_v)
            aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else {}  # the TA-MoE layers only
            if masses:
                aux["aia"] = jnp.stack(masses)  # every layer
        if cache is not None:
            cache = KVCache(k=new_k, v=new_v, segment=segment, index=index + seq)
        return constrain(self.norm(x), RESIDUAL), cache, aux
