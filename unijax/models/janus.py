"""The unified Janus-Pro model: one LLaMA decoder, two input paths, two heads.

Batch contract (DESIGN.md): `tokens [B, T]` hold text ids, the image placeholder id at
understanding-image slots and VQ code ids at generated-image slots; `modality [B, T]` says which
(`TEXT`, `UND_IMAGE`, `GEN_IMAGE`); `positions` and `segment_ids` `[B, T]` handle padding (segment 0)
and packing. Understanding pixels `[B, n_images, H, W, C]` fill the `UND_IMAGE` slots of their row
in order, by gather (jit-safe, no boolean indexing). Heads are applied by the caller, only where
logits are needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unijax.contract import GEN_IMAGE, TEXT, UND_IMAGE
from unijax.models.config import JanusConfig
from unijax.models.decoder import Decoder, KVCache
from unijax.models.layers import embed, fill_in_order, gelu, linear
from unijax.models.vision import MLPProjector, VisionModel
from unijax.models.vq import VQModel

Array = jax.Array



class GenerationHead(nnx.Module):
    """`vision_head(gelu(proj_out(h)))`: hidden -> image-code logits."""

    def __init__(self, cfg: JanusConfig, *, rngs: nnx.Rngs):
        q = cfg.vq
        kw = dict(rngs=rngs, bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.proj_out = linear(q.image_token_embed_dim, q.projection_dim, ("embed", "embed_out"), **kw)
        self.vision_head = linear(q.projection_dim, q.num_embeddings, ("embed_out", "codebook"), **kw)

    def __call__(self, h: Array) -> Array:
        return self.vision_head(gelu(self.proj_out(h)))


class DecoderModel(nnx.Module):
    """The decoder side Janus and Emu3 share: the forward pass over the batch contract, cached
    decoding steps and the text head. A family supplies `embed_inputs`, `language_model`, `lm_head`
    and `image_logits`."""

    def __call__(self, tokens: Array, modality: Array, positions: Array, segment_ids: Array,
                 pixels: Array | None = None, cache: KVCache | None = None, task: Array | None = None,
                 return_aux: bool = False, capture_aia: Array | None = None, aia_impl: str = "lean"):
        """Returns (final hidden states `[B, T, embed]`, cache), plus the TA-MoE aux tree (layer-stacked;
        `unijax.models.moe`) when `return_aux`. `task [B, T]` (0 MMU, 1 T2I) is needed by TA-MoE
        layers routing by label. `capture_aia [B, T]` (bool: the keys whose attention mass AIA
        measures; off when None) adds `aux["aia"] [layers, B, T]`, each query's mass on them
        averaged over heads, by the `aia_impl` path ("lean" or "explicit"; `unijax.models.layers`)."""
        x = self.embed_inputs(tokens, modality, pixels)
        h, cache, aux = self.language_model(x, positions, segment_ids, cache, task, capture_aia, aia_impl)
        return (h, cache, aux) if return_aux else (h, cache)

    def decode_embeds(self, x: Array, positions: Array, segment_ids: Array, cache: KVCache | None = None,
                      task: Array | None = None, return_aux: bool = False):
        h, cache, aux = self.language_model(x, positions, segment_ids, cache, task)
        return (h, cache, aux) if return_aux else (h, cache)

    def text_logits(self, h: Array) -> Array:
        return self.lm_head(h)


class Janus(DecoderModel):
    def __init__(self, cfg: JanusConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        t, v, q = cfg.text, cfg.vision, cfg.vq
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.vision_model = VisionModel(v, **kw)
        self.aligner = MLPProjector(v.hidden_size, v.projection_dim, v.aligner_depth, **kw)
        self.vqmodel = VQModel(q, **kw)
        self.generation_embeddings = embed(q.num_embeddings, q.embed_dim, ("codebook", None), **kw)
        self.generation_aligner = MLPProjector(q.embed_dim, q.projection_dim, q.aligner_depth, in_axis=None, **kw)
        self.generation_head = GenerationHead(cfg, rngs=rngs)
        self.language_model = Decoder(cfg, rngs=rngs)
        self.lm_head = linear(t.hidden_size, t.vocab_size, ("embed", "vocab"), std=t.initializer_range, **kw)

    # -- input paths --------------------------------------------------------------------
    def image_features(self, pixels: Array) -> Array:
        """Understanding path: pixels `[B, H, W, C]` -> aligned features `[B, patches, embed]`."""
        return self.aligner(self.vision_model(pixels))

    def embed_image_codes(self, codes: Array) -> Array:
        """Generation path: VQ codes `[B, T]` -> `[B, T, embed]`."""
        return self.generation_aligner(self.generation_embeddings(codes))

    def embed_inputs(self, tokens: Array, modality: Array, pixels: Array | None = None) -> Array:
        """Input embeddings `[B, T, embed]` for a mixed batch (see the module docstring)."""
        dtype = jnp.dtype(self.cfg.dtype)
        x = self.language_model.embed_tokens(jnp.where(modality == TEXT, tokens, 0)).astype(dtype)
        codes = jnp.clip(jnp.where(modality == GEN_IMAGE, tokens, 0), 0, self.cfg.vq.num_embeddings - 1)
        x = jnp.where((modality == GEN_IMAGE)[..., None], self.embed_image_codes(codes).astype(dtype), x)
        if pixels is not None:
            b, n = pixels.shape[:2]
            feats = self.image_features(pixels.reshape(b * n, *pixels.shape[2:]))
            feats = feats.reshape(b, -1, feats.shape[-1]).astype(dtype)  # [B, n*patches, E]
            x = fill_in_order(modality == UND_IMAGE, feats, x)
        return x

    def image_logits(self, h: Array) -> Array:
        return self.generation_head(h)
