"""Emu3's VQ-VAE (transformers `Emu3VQVAE`), for images.

Images are NHWC in [-1, 1]. `encode(pixels) -> codes [B, h, w]`, `decode(codes) -> pixels`.
Emu3's tokenizer is a video model: an image enters as `temporal_downsample_factor` identical
frames, the 2-D encoder runs per frame, causal temporal convolutions (`Conv3d`, padded 2 in
front) fold the frames into one latent frame, and the decoder unfolds them again; the image is
the first decoded frame. Frames are identical, so the 2-D encoder runs once and its output is
broadcast over time (the same numbers as running it per frame). The decoder's norms are
"spatial norms": a GroupNorm whose scale and shift are 1x1 convolutions of the quantised latents.
Temporal residual blocks use BatchNorm with running statistics (inference mode: the statistics
are parameters here, read through `stop_gradient`; stage 0 (`train.objective=vq`) trains everything
else with them fixed, so there each BatchNorm is a per-channel affine map). Module names follow
transformers' so the checkpoint mapping (`unijax.models.family.emu3.HF_RENAMES`) is a prefix change.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unijax.models.layers import dtype_of, embed, linear
from unijax.models.vq import Downsample, Upsample, conv, group_norm, swish

Array = jax.Array
GROUPS = 32


class Conv3d(nnx.Module):
    """`Emu3VQVAEConv3d` on `[B, T, H, W, C]`: spatial padding `k - s` split (more on the leading
    side), temporal padding 2 in front (causal), no temporal padding behind."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int], *, rngs,
                 dtype, param_dtype):
        pads = ((2, 0),) + tuple(((k - s) // 2 + (k - s) % 2, (k - s) // 2) for k, s in zip(kernel[1:], stride[1:]))
        self.conv = nnx.Conv(cin, cout, kernel, strides=stride, padding=pads, dtype=dtype_of(dtype),
                             param_dtype=dtype_of(param_dtype), rngs=rngs,
                             kernel_metadata={"out_sharding": (None, None, None, "conv_in", "conv_out")},
                             bias_metadata={"out_sharding": ("conv_out",)})

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class BatchNorm(nnx.Module):
    """Inference-mode `BatchNorm3d` over the channel axis (running statistics, eps 1e-5)."""

    def __init__(self, ch: int, *, param_dtype, **_):
        dt = dtype_of(param_dtype)
        self.weight = nnx.Param(jnp.ones((ch,), dt), out_sharding=("conv_out",))
        self.bias = nnx.Param(jnp.zeros((ch,), dt), out_sharding=("conv_out",))
        self.running_mean = nnx.Param(jnp.zeros((ch,), dt), out_sharding=("conv_out",))
        self.running_var = nnx.Param(jnp.ones((ch,), dt), out_sharding=("conv_out",))

    def __call__(self, x: Array) -> Array:
        mean, var = (jax.lax.stop_gradient(v[...].astype(jnp.float32)) for v in (self.running_mean, self.running_var))
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + 1e-5)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class TemporalResnetBlock(nnx.Module):
    def __init__(self, ch: int, **kw):
        self.norm1 = BatchNorm(ch, **kw)
        self.conv1 = Conv3d(ch, ch, (3, 3, 3), (1, 1, 1), **kw)
        self.norm2 = BatchNorm(ch, **kw)
        self.conv2 = Conv3d(ch, ch, (3, 3, 3), (1, 1, 1), **kw)

    def __call__(self, x: Array) -> Array:
        h = self.conv1(swish(self.norm1(x)))
        return x + self.conv2(swish(self.norm2(h)))


class TemporalDownsample(nnx.Module):
    def __init__(self, ch: int, **kw):
        self.conv = Conv3d(ch, ch, (4, 3, 3), (2, 1, 1), **kw)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class TemporalUpsample(nnx.Module):
    def __init__(self, ch: int, **kw):
        self.conv = Conv3d(ch, ch, (3, 3, 3), (1, 1, 1), **kw)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(x, 2, axis=1))  # nearest x2 in time


class SpatialNorm(nnx.Module):
    """GroupNorm(h) * conv_y(zq) + conv_b(zq), `zq` resized (nearest) to h's resolution."""

    def __init__(self, quant_ch: int, ch: int, **kw):
        self.norm_layer = group_norm(ch, GROUPS, **kw)
        self.conv_y = conv(quant_ch, ch, 1, **kw)
        self.conv_b = conv(quant_ch, ch, 1, **kw)

    def __call__(self, x: Array, zq: Array) -> Array:
        f = x.shape[1] // zq.shape[1]
        zq = jnp.repeat(jnp.repeat(zq, f, axis=1), f, axis=2)
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


def _norm(ch: int, quant_ch: int | None, **kw):
    return SpatialNorm(quant_ch, ch, **kw) if quant_ch is not None else group_norm(ch, GROUPS, **kw)


def _apply_norm(norm, x: Array, zq: Array | None) -> Array:
    return norm(x, zq) if isinstance(norm, SpatialNorm) else norm(x)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, quant_ch: int | None = None, **kw):
        self.norm1 = _norm(cin, quant_ch, **kw)
        self.conv1 = conv(cin, cout, 3, **kw)
        self.norm2 = _norm(cout, quant_ch, **kw)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.nin_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: Array, zq: Array | None = None) -> Array:
        h = self.conv1(swish(_apply_norm(self.norm1, x, zq)))
        h = self.conv2(swish(_apply_norm(self.norm2, h, zq)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttentionBlock(nnx.Module):
    """Multi-head self-attention over all positions of a feature map (`Emu3VQVAEAttentionBlock`)."""

    def __init__(self, ch: int, heads: int, *, rngs, dtype, param_dtype):
        if ch % heads:
            raise ValueError(f"model.vq.hidden_size={ch} must be a multiple of model.vq.num_attention_heads={heads}")
        kw = dict(rngs=rngs, bias=True, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (linear(ch, ch, ("conv_in", "conv_out"), **kw)
                                                                for _ in range(4))

    def __call__(self, x: Array) -> Array:
        b, n, c = x.shape
        d = c // self.heads
        q, k, v = (p(x).reshape(b, n, self.heads, d) for p in (self.q_proj, self.k_proj, self.v_proj))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d**-0.5
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)
        return self.out_proj(out.reshape(b, n, c))


def _attend(attn: AttentionBlock, norm, x: Array, zq: Array | None) -> Array:
    b, h, w, c = x.shape
    return x + attn(_apply_norm(norm, x, zq).reshape(b, h * w, c)).reshape(b, h, w, c)


class MiddleBlock(nnx.Module):
    def __init__(self, ch: int, heads: int, quant_ch: int | None = None, **kw):
        self.block_1 = ResnetBlock(ch, ch, quant_ch, **kw)
        self.attn_1 = AttentionBlock(ch, heads, **kw)
        self.attn_norm = _norm(ch, quant_ch, **kw)
        self.block_2 = ResnetBlock(ch, ch, quant_ch, **kw)

    def __call__(self, x: Array, zq: Array | None = None) -> Array:
        x = self.block_1(x, zq)
        return self.block_2(_attend(self.attn_1, self.attn_norm, x, zq), zq)


class Level(nnx.Module):
    """One resolution of the encoder (`down[i]`) or decoder (`up[i]`): residual blocks, each followed
    by attention at `attn_resolutions`, then the resample."""

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, heads: int, resample, quant_ch=None, **kw):
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, quant_ch, **kw) for i in range(n_blocks)])
        self.attn = nnx.List([AttentionBlock(cout, heads, **kw) for _ in range(n_blocks)] if attn else [])
        self.attn_norms = nnx.List([_norm(cout, quant_ch, **kw) for _ in range(n_blocks)] if attn else [])
        self.resample = resample(cout, **kw) if resample is not None else None

    def __call__(self, x: Array, zq: Array | None = None) -> Array:
        for i, block in enumerate(self.block):
            x = block(x, zq)
            if len(self.attn):
                x = _attend(self.attn[i], self.attn_norms[i], x, zq)
        return x if self.resample is None else self.resample(x)


class Encoder(nnx.Module):
    def __init__(self, q, **kw):
        mult, base, n = q.channel_multiplier, q.base_channels, len(q.channel_multiplier)
        cin = (1,) + tuple(mult)
        self.conv_in = conv(q.in_channels, base, 3, **kw)
        self.down = nnx.List([Level(base * cin[i], base * mult[i], q.num_res_blocks, i in q.attn_resolutions,
                                    q.num_attention_heads, Downsample if i != n - 1 else None, **kw)
                              for i in range(n)])
        ch = base * mult[-1]
        self.middle_block = MiddleBlock(ch, q.num_attention_heads, **kw)
        self.norm_out = group_norm(ch, GROUPS, **kw)
        out = 2 * q.latent_channels if q.double_latent else q.latent_channels
        self.conv_out = conv(ch, out, 3, **kw)
        self.time_conv = nnx.List([TemporalDownsample(out, **kw) for _ in range(int(math.log2(q.temporal_factor)))])
        self.time_res_stack = nnx.List([TemporalResnetBlock(out, **kw) for _ in range(q.num_res_blocks)])
        self.frames = q.temporal_factor

    def __call__(self, x: Array) -> Array:
        """`[B, H, W, C]` -> `[B, 1, h, w, latent]` (one latent frame)."""
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.conv_out(swish(self.norm_out(self.middle_block(x))))
        x = jnp.broadcast_to(x[:, None], (x.shape[0], self.frames, *x.shape[1:]))  # identical frames
        for c in self.time_conv:
            x = swish(c(x))
        for block in self.time_res_stack:
            x = block(x)
        return x


class Decoder(nnx.Module):
    def __init__(self, q, **kw):
        mult, base, n = q.channel_multiplier, q.base_channels, len(q.channel_multiplier)
        lc, qc = q.latent_channels, q.embed_dim
        self.time_res_stack = nnx.List([TemporalResnetBlock(lc, **kw) for _ in range(q.num_res_blocks)])
        self.time_conv = nnx.List([TemporalUpsample(lc, **kw) for _ in range(int(math.log2(q.temporal_factor)))])
        ch = base * mult[-1]
        self.conv_in = conv(lc, ch, 3, **kw)
        self.middle_block = MiddleBlock(ch, q.num_attention_heads, qc, **kw)
        levels = [None] * n
        for i in reversed(range(n)):  # up[i] is resolution level i, run from the lowest resolution up
            levels[i] = Level(ch, base * mult[i], q.num_res_blocks + 1, i in q.attn_resolutions,
                              q.num_attention_heads, Upsample if i != 0 else None, qc, **kw)
            ch = base * mult[i]
        self.up = nnx.List(levels)
        self.norm_out = SpatialNorm(qc, ch, **kw)
        self.conv_out = conv(ch, q.out_channels, 3, **kw)

    def __call__(self, post_quant: Array, quant: Array) -> Array:
        """`[B, 1, h, w, latent]` latents and quantised codes -> first decoded frame `[B, H, W, C]`.
        The quantised codes go through the same temporal stack as the latents (as in transformers)."""
        b = post_quant.shape[0]
        x = jnp.concatenate([post_quant, quant], axis=0)
        for block in self.time_res_stack:
            x = block(x)
        for c in self.time_conv:
            x = swish(c(x))
        h, zq = x[:b, 0], x[b:, 0]  # the image is the first frame; the decoder below is per frame
        h = self.middle_block(self.conv_in(h), zq)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h, zq)
        return self.conv_out(swish(self.norm_out(h, zq)))


class Emu3VQ(nnx.Module):
    def __init__(self, q, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = Encoder(q, **kw)
        self.decoder = Decoder(q, **kw)
        self.quantize = embed(q.codebook_size, q.embed_dim, ("codebook", None), **kw)
        self.quant_conv = Conv3d(q.latent_channels, q.embed_dim, (3, 1, 1), (1, 1, 1), **kw)
        self.post_quant_conv = Conv3d(q.embed_dim, q.latent_channels, (3, 1, 1), (1, 1, 1), **kw)

    def encode_latents(self, pixels: Array) -> Array:
        """pixels `[B, H, W, C]` -> pre-quantisation latents `[B, h, w, embed_dim]`."""
        return self.quant_conv(self.encoder(pixels))[:, 0]

    def codebook(self) -> Array:
        """The codebook entries as `quantize_latents` compares them (float32, not normalised)."""
        return self.quantize.embedding[...].astype(jnp.float32)

    def latent_space(self, z: Array) -> Array:
        """Pre-quantisation latents in the codebook's space: float32, not normalised."""
        return z.astype(jnp.float32)

    def quantize_latents(self, z: Array) -> tuple[Array, Array]:
        """Nearest codebook entry by squared L2 distance (no normalisation, unlike Janus's VQ):
        returns (codes `[B, h*w]`, quantised `[B, h, w, D]`)."""
        b, h, w, d = z.shape
        zf = self.latent_space(z).reshape(b, h * w, d)
        book = self.codebook()
        dist = (jnp.sum(zf * zf, -1, keepdims=True) + jnp.sum(book * book, -1)
                - 2 * jnp.einsum("bnd,kd->bnk", zf, book, precision="highest"))
        codes = jnp.argmin(dist, axis=-1)
        return codes, book[codes].reshape(b, h, w, d)

    def encode(self, pixels: Array) -> Array:
        """pixels `[B, H, W, C]` in [-1, 1] -> codes `[B, h, w]` (int32)."""
        z = self.encode_latents(pixels)
        return self.quantize_latents(z)[0].reshape(z.shape[:3]).astype(jnp.int32)

    def decode_quantized(self, zq: Array) -> Array:
        """Quantised latents `[B, h, w, D]` (codebook entries, or their straight-through stand-in) ->
        pixels. They condition the decoder twice: through `post_quant_conv` and its spatial norms."""
        quant = zq[:, None].astype(self.post_quant_conv.conv.kernel.dtype)  # one latent frame
        return self.decoder(self.post_quant_conv(quant), quant)

    def decode(self, codes: Array) -> Array:
        """codes `[B, h, w]` (or `[B, h * w]`, square) -> pixels `[B, H, W, C]` (roughly [-1, 1])."""
        if codes.ndim == 2:
            g = math.isqrt(codes.shape[1])
            codes = codes.reshape(codes.shape[0], g, g)
        return self.decode_quantized(self.quantize(codes))
