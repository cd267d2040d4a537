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


def filter_rows(logits, temperature, top_k, top_p):
    """`filter_logits(logits[i] / temperature[i], top_k[i], top_p[i])` for every row of `[B, V]` at
    once, the settings traced (`[B]` each; a row of temperature 0 is left unscaled)."""
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(jnp.where(ordered < kth, NEG_INF, ordered), axis=-1)
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p >= 1.0)[:, None]  # 1: off, exactly
    threshold = jnp.maximum(jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True), kth)
    return jnp.where(scaled < threshold, NEG_INF, scaled)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One token per row of `logits [B, V]` with per-row settings (traced, so one compiled program
    serves every mix of requests): `keys [B]` (`jax.random.key`), `temperature [B]` (0: greedy),
    `top_k [B]` int (0: off), `top_p [B]` (1: off). Row i draws from `filter_rows`' row i, as
    `sample(logits[i:i+1], keys[i], s_i)` draws from `filter_logits`; greedy rows take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_rows(logits, temperature, top_k, top_p)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
