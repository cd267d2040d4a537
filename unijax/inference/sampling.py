"""Token sampling: greedy, temperature, top-k and top-p (nucleus), all jit-friendly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from unijax.models.layers import NEG_INF


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Masks logits `[..., V]` outside the top-k and outside the smallest set with mass >= top_p."""
    logits = logits.astype(jnp.float32)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep tokens whose preceding mass is < top_p (the first token is always kept)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def sample(logits, rng, s: Sampling):
    """One token per row of `logits [B, V]` -> `[B]` int32."""
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / s.temperature, s.top_k, s.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
