"""The Emu3 model (transformers `Emu3ForConditionalGeneration`): one decoder, one LM head, one VQ
tokenizer whose codes are vocabulary ids.

The batch contract is Janus's (`unijax.models.janus`): `tokens`, `modality`, `positions`,
`segment_ids` `[B, T]`. Image tokens are in-vocabulary, so only the modality mask tells them from
text: at `UND_IMAGE` slots the image's tokens (its VQ codes as visual-token ids, each row ended by
the end-of-line id, exactly transformers' `<image>` placeholder expansion) are filled in order from
`pixels`; `GEN_IMAGE` slots hold VQ codes (`0..codebook_size-1`) and are embedded as their visual
tokens. The decoder is the shared LLaMA stack (`unijax.models.decoder`): attention with AIA capture,
SwiGLU or TA-MoE FFNs. `text_logits` is the LM head over the whole vocabulary; `image_logits` is the
same head restricted to the visual tokens, i.e. logits over codes (what image generation samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unijax.contract import GEN_IMAGE, UND_IMAGE
from unijax.models.decoder import Decoder
from unijax.models.emu3_config import Emu3Config
from unijax.models.emu3_vq import Emu3VQ
from unijax.models.janus import DecoderModel
from unijax.models.layers import fill_in_order, linear

Array = jax.Array


class Emu3(DecoderModel):
    def __init__(self, cfg: Emu3Config, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.vqmodel = Emu3VQ(cfg.vq, **kw)
        self.language_model = Decoder(cfg, rngs=rngs)
        self.lm_head = linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), std=cfg.text.initializer_range,
                              **kw)

    # -- images <-> vocabulary ------------------------------------------------------------
    def codes_to_ids(self, codes: Array) -> Array:
        """codes `[B, h, w]` -> vocabulary ids `[B, h * (w + 1)]`, each row ended by end-of-line."""
        b, h, w = codes.shape
        ids = codes.astype(jnp.int32) + self.cfg.visual_token_offset
        eol = jnp.full((b, h, 1), self.cfg.eol_token_id, jnp.int32)
        return jnp.concatenate([ids, eol], axis=-1).reshape(b, h * (w + 1))

    def ids_to_codes(self, ids: Array, h: int, w: int) -> Array:
        """The inverse: `[B, h * (w + 1)]` -> `[B, h, w]` (end-of-line slots dropped)."""
        codes = ids.reshape(ids.shape[0], h, w + 1)[..., :w] - self.cfg.visual_token_offset
        return jnp.clip(codes, 0, self.cfg.vq.codebook_size - 1)

    def image_token_ids(self, pixels: Array) -> Array:
        """pixels `[B, H, W, C]` in [-1, 1] -> the image's vocabulary ids `[B, h * (w + 1)]`."""
        return self.codes_to_ids(self.vqmodel.encode(pixels))

    # -- input paths ----------------------------------------------------------------------
    def embed_inputs(self, tokens: Array, modality: Array, pixels: Array | None = None) -> Array:
        """Without `pixels`, image slots of both kinds hold VQ codes (the training layout, where
        end-of-line tokens are TEXT slots); with `pixels`, `UND_IMAGE` slots are transformers'
        placeholders, end-of-line included, filled from the pixels."""
        is_code = (modality == GEN_IMAGE) | ((modality == UND_IMAGE) & (pixels is None))
        ids = jnp.where(is_code, jnp.clip(tokens, 0, self.cfg.vq.codebook_size - 1) + self.cfg.visual_token_offset,
                        tokens)
        if pixels is not None:
            b, n = pixels.shape[:2]
            image_ids = self.image_token_ids(pixels.reshape(b * n, *pixels.shape[2:])).reshape(b, -1)
            ids = fill_in_order(modality == UND_IMAGE, image_ids, ids)
        return self.language_model.embed_tokens(ids).astype(jnp.dtype(self.cfg.dtype))

    def embed_image_codes(self, codes: Array) -> Array:
        return self.language_model.embed_tokens(codes + self.cfg.visual_token_offset)

    # -- heads (the text head and the forward pass: DecoderModel) ---------------------------

    def image_logits(self, h: Array) -> Array:
        """Logits over VQ codes: the LM head's visual-token columns."""
        k = self.lm_head.kernel[...]
        w = jax.lax.dynamic_slice_in_dim(k, self.cfg.visual_token_offset, self.cfg.vq.codebook_size, axis=1)
        return jnp.einsum("...e,ev->...v", h, w.astype(h.dtype))
