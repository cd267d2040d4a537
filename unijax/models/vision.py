"""SigLIP-style understanding encoder (patch conv, learned positions, pre-LN blocks) and aligner."""

from __future__ import annotations

import math

import jax
from flax import nnx

from unijax.models.layers import dot_product_attention, dtype_of, gelu, layer_norm, linear

Array = jax.Array


class MLPProjector(nnx.Module):
    """`fc1`, then (`depth - 1`) x [GELU, linear]: the Janus aligners (understanding and generation)."""

    def __init__(self, din: int, dout: int, depth: int, *, rngs: nnx.Rngs, dtype="float32",
                 param_dtype="float32", in_axis: str = "vision_embed"):
        kw = dict(rngs=rngs, bias=True, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(din, dout, (in_axis, "embed"), **kw)
        self.hidden_layers = nnx.List([linear(dout, dout, ("embed_in", "embed"), **kw) for _ in range(depth - 1)])

    def __call__(self, x: Array) -> Array:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(gelu(x))
        return x


class VisionEmbeddings(nnx.Module):
    def __init__(self, v, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.patch_embedding = nnx.Conv(
            v.num_channels, v.hidden_size, (v.patch_size, v.patch_size), strides=v.patch_size, padding="VALID",
            dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype), rngs=rngs,
            kernel_metadata={"out_sharding": (None, None, None, "vision_embed")},
            bias_metadata={"out_sharding": ("vision_embed",)})
        # SigLIP's init (std 1/sqrt(width)): positions start as visible as patch content; at std 0.02 a
        # from-scratch encoder starts position-blind and shape/position questions train far slower
        self.position_embedding = nnx.Embed(
            v.num_patches, v.hidden_size, dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype), rngs=rngs,
            embedding_init=nnx.initializers.normal(1.0 / math.sqrt(v.hidden_size)),
            embedding_metadata={"out_sharding": (None, "vision_embed")})

    def __call__(self, pixels: Array) -> Array:
        x = self.patch_embedding(pixels.astype(self.patch_embedding.kernel.dtype))  # [B, gh, gw, D]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class VisionAttention(nnx.Module):
    def __init__(self, v, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.num_heads = v.num_heads
        kw = dict(rngs=rngs, bias=v.attention_bias, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = linear(v.hidden_size, v.hidden_size, ("vision_embed", "vision_heads"), **kw)
        self.k_proj = linear(v.hidden_size, v.hidden_size, ("vision_embed", "vision_heads"), **kw)
        self.v_proj = linear(v.hidden_size, v.hidden_size, ("vision_embed", "vision_heads"), **kw)
        self.projection_layer = linear(v.hidden_size, v.hidden_size, ("vision_heads", "vision_embed"),
                                       **{**kw, "bias": True})

    def __call__(self, x: Array) -> Array:
        b, s, d = x.shape
        hd = d // self.num_heads
        q, k, w = (p(x).reshape(b, s, self.num_heads, hd) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = dot_product_attention(q, k.transpose(0, 2, 1, 3), w.transpose(0, 2, 1, 3), None, 1.0 / math.sqrt(hd))
        return self.projection_layer(out.reshape(b, s, d))


class VisionMLP(nnx.Module):
    def __init__(self, v, *, rngs: nnx.Rngs, dtype, param_dtype):
        inner = int(v.hidden_size * v.mlp_ratio)
        kw = dict(rngs=rngs, bias=True, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(v.hidden_size, inner, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = linear(inner, v.hidden_size, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(gelu(self.fc1(x)))


class VisionEncoderLayer(nnx.Module):
    def __init__(self, v, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = layer_norm(v.hidden_size, v.layer_norm_eps, axis_name="vision_embed", **kw)
        self.self_attn = VisionAttention(v, **kw)
        self.layer_norm2 = layer_norm(v.hidden_size, v.layer_norm_eps, axis_name="vision_embed", **kw)
        self.mlp = VisionMLP(v, **kw)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionModel(nnx.Module):
    """pixels `[batch, H, W, C]` (normalised to [-1, 1]) -> patch features `[batch, patches, vision_embed]`."""

    def __init__(self, v, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = VisionEmbeddings(v, **kw)
        self.layers = nnx.List([VisionEncoderLayer(v, **kw) for _ in range(v.num_layers)])
        self.post_layernorm = layer_norm(v.hidden_size, v.layer_norm_eps, axis_name="vision_embed", **kw)

    def __call__(self, pixels: Array) -> Array:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
