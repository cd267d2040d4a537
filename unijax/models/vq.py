"""VQ-16 image tokenizer in the Janus / LlamaGen layout (transformers `JanusVQVAE`).

Images are NHWC in [-1, 1]. `encode(pixels) -> codes [batch, grid*grid]` and
`decode(codes) -> pixels`. The codebook is L2-normalised on both sides, as in LlamaGen's VQ-16
(`codebook_l2_norm=True`); transformers' `JanusVQVAE.decode` normalises the looked-up entries the
same way, so decoding matches it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unijax.models.layers import dtype_of, embed

Array = jax.Array


def conv(cin: int, cout: int, k: int, *, rngs, dtype, param_dtype, stride: int = 1, padding="SAME") -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype_of(dtype),
                    param_dtype=dtype_of(param_dtype), rngs=rngs,
                    kernel_metadata={"out_sharding": (None, None, "conv_in", "conv_out")},
                    bias_metadata={"out_sharding": ("conv_out",)})


def group_norm(ch: int, groups: int, *, rngs, dtype, param_dtype) -> nnx.GroupNorm:
    return nnx.GroupNorm(ch, num_groups=groups, epsilon=1e-6, dtype=dtype_of(dtype),
                         param_dtype=dtype_of(param_dtype), rngs=rngs,
                         scale_metadata={"out_sharding": ("conv_out",)},
                         bias_metadata={"out_sharding": ("conv_out",)})


def position_norm(norm: nnx.GroupNorm, x: Array) -> Array:
    """`norm`'s scale and bias over statistics of each position's channels (a local encoder's norm)
    instead of each group's over the whole image."""
    y = x.astype(jnp.float32)
    y = (y - y.mean(-1, keepdims=True)) * jax.lax.rsqrt(y.var(-1, keepdims=True) + norm.epsilon)
    return (y * norm.scale[...] + norm.bias[...]).astype(x.dtype)


def _norm(norm: nnx.GroupNorm, x: Array, local: bool) -> Array:
    return position_norm(norm, x) if local else norm(x)


def swish(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """As `torch.nn.functional.normalize(x, p=2, dim=-1)`."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, groups: int, **kw):
        self.norm1 = group_norm(cin, groups, **kw)
        self.conv1 = conv(cin, cout, 3, **kw)
        self.norm2 = group_norm(cout, groups, **kw)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.nin_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: Array, local: bool = False) -> Array:
        h = self.conv1(swish(_norm(self.norm1, x, local)))
        h = self.conv2(swish(_norm(self.norm2, h, local)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all spatial positions (1x1 conv projections)."""

    def __init__(self, ch: int, groups: int, **kw):
        self.norm = group_norm(ch, groups, **kw)
        self.q, self.k, self.v, self.proj_out = (conv(ch, ch, 1, **kw) for _ in range(4))

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (p(y).reshape(b, h * w, c) for p in (self.q, self.k, self.v))
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
        out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
        return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
    """Pad bottom/right by one, then a stride-2 3x3 conv."""

    def __init__(self, ch: int, **kw):
        self.conv = conv(ch, ch, 3, stride=2, padding="VALID", **kw)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int, **kw):
        self.conv = conv(ch, ch, 3, **kw)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class MidBlock(nnx.Module):
    def __init__(self, ch: int, groups: int, **kw):
        self.block_1 = ResnetBlock(ch, ch, groups, **kw)
        self.attn_1 = AttnBlock(ch, groups, **kw)
        self.block_2 = ResnetBlock(ch, ch, groups, **kw)

    def __call__(self, x: Array, local: bool = False) -> Array:
        x = self.block_1(x, local)
        return self.block_2(x if local else self.attn_1(x), local)


class Level(nnx.Module):
    """One resolution: residual blocks, attention after each block at the lowest resolution, resample."""

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, resample, groups: int, **kw):
        self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw) for i in range(n_blocks)])
        self.attn = nnx.List([AttnBlock(cout, groups, **kw) for _ in range(n_blocks)] if attn else [])
        self.resample = resample(cout, **kw) if resample is not None else None

    def __call__(self, x: Array, local: bool = False) -> Array:
        """`local`: position norms and no attention (`VQConfig.local_encoder`)."""
        for i, block in enumerate(self.block):
            x = block(x, local)
            if len(self.attn) and not local:
                x = self.attn[i](x)
        return x if self.resample is None else self.resample(x)


class Encoder(nnx.Module):
    """`q.local_encoder`: every norm per position and no attention, so that a latent depends on its
    receptive field only; the attention parameters stay (unused), so either kind loads any checkpoint."""

    def __init__(self, q, **kw):
        self.local = bool(q.local_encoder)
        mult, base, n = q.channel_multiplier, q.base_channels, len(q.channel_multiplier)
        self.conv_in = conv(q.in_channels, base, 3, **kw)
        cin = (1,) + tuple(mult)
        self.down = nnx.List([
            Level(base * cin[i], base * mult[i], q.num_res_blocks, i == n - 1,
                  Downsample if i != n - 1 else None, q.num_groups, **kw) for i in range(n)])
        ch = base * mult[-1]
        self.mid = MidBlock(ch, q.num_groups, **kw)
        self.norm_out = group_norm(ch, q.num_groups, **kw)
        self.conv_out = conv(ch, q.latent_channels, 3, **kw)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x, self.local)
        return self.conv_out(swish(_norm(self.norm_out, self.mid(x, self.local), self.local)))


class Decoder(nnx.Module):
    def __init__(self, q, **kw):
        mult, base, n = q.channel_multiplier, q.base_channels, len(q.channel_multiplier)
        ch = base * mult[-1]
        self.conv_in = conv(q.latent_channels, ch, 3, **kw)
        self.mid = MidBlock(ch, q.num_groups, **kw)
        levels = []
        for i in reversed(range(n)):  # up[0] is the lowest resolution, as in transformers
            levels.append(Level(ch, base * mult[i], q.num_res_blocks + 1, i == n - 1,
                                Upsample if i != 0 else None, q.num_groups, **kw))
            ch = base * mult[i]
        self.up = nnx.List(levels)
        self.norm_out = group_norm(ch, q.num_groups, **kw)
        self.conv_out = conv(ch, q.out_channels, 3, **kw)

    def __call__(self, x: Array) -> Array:
        x = self.mid(self.conv_in(x))
        for level in self.up:
            x = level(x)
        return self.conv_out(swish(self.norm_out(x)))


class VQModel(nnx.Module):
    def __init__(self, q, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.grid = q.grid
        self.encoder = Encoder(q, **kw)
        self.quant_conv = conv(q.latent_channels, q.embed_dim, 1, **kw)
        self.quantize = embed(q.num_embeddings, q.embed_dim, ("codebook", None), **kw)
        self.post_quant_conv = conv(q.embed_dim, q.latent_channels, 1, **kw)
        self.decoder = Decoder(q, **kw)

    def codebook(self) -> Array:
        return l2_normalize(self.quantize.embedding[...].astype(jnp.float32))

    def encode_latents(self, pixels: Array) -> Array:
        """pixels `[B, H, W, C]` -> pre-quantisation latents `[B, h, w, embed_dim]`."""
        return self.quant_conv(self.encoder(pixels))

    def quantize_latents(self, z: Array) -> tuple[Array, Array]:
        """Nearest L2-normalised codebook entry: returns (codes `[B, h*w]`, quantised `[B, h, w, D]`)."""
        b, h, w, d = z.shape
        zf = self.latent_space(z).reshape(b, h * w, d)
        book = self.codebook()
        codes = jnp.argmax(jnp.einsum("bnd,kd->bnk", zf, book), axis=-1)  # max cosine == min L2 distance
        return codes, book[codes].reshape(b, h, w, d)

    def latent_space(self, z: Array) -> Array:
        """Pre-quantisation latents in the codebook's space (float32, L2-normalised): what
        `quantize_latents` compares with `codebook()` and the VQ losses pull together."""
        return l2_normalize(z.astype(jnp.float32))

    def encode(self, pixels: Array) -> Array:
        """pixels `[B, H, W, C]` in [-1, 1] -> codes `[B, grid*grid]` (int32)."""
        return self.quantize_latents(self.encode_latents(pixels))[0].astype(jnp.int32)

    def decode_quantized(self, zq: Array) -> Array:
        """Quantised latents `[B, h, w, D]` (codebook entries, or their straight-through stand-in) -> pixels."""
        return self.decoder(self.post_quant_conv(zq.astype(self.post_quant_conv.kernel.dtype)))

    def decode(self, codes: Array) -> Array:
        """codes `[B, grid*grid]` -> pixels `[B, H, W, C]` (roughly [-1, 1])."""
        b = codes.shape[0]
        return self.decode_quantized(self.codebook()[codes].reshape(b, self.grid, self.grid, -1))
