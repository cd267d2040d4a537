"""VQ tokenizer training losses (LlamaGen's `VQLoss` minus the GAN and perceptual terms), for Janus's
VQ-16 (`unijax.models.vq.VQModel`) and Emu3's VQ-VAE (`unijax.models.emu3_vq.Emu3VQ`).

Notation (per batch; `sg` is `jax.lax.stop_gradient`, means run over every element):

    z      = l2_normalize(quant_conv(encoder(x)))             [B, h, w, D]   (Janus, `codebook_l2_norm=True`;
    e_k    = l2_normalize(embedding[k])                        [K, D]          Emu3: neither is normalised)
    c      = argmin_k ||z - e_k||^2  (= argmax_k <z, e_k>)     [B, h*w]
    zq     = e_c                                               [B, h, w, D]
    zq_st  = z + sg(zq - z)                                    straight-through estimator
    x_rec  = decoder(post_quant_conv(zq_st))                   [B, H, W, C]   (Emu3: its spatial norms see zq_st too)

    L_rec      = mean((x_rec - x)^2)            (recon="l2")  or  mean(|x_rec - x|)  (recon="l1")
    L_codebook = mean((sg(z) - zq)^2)                         moves the codebook towards the encoder
    L_commit   = beta * mean((z - sg(zq))^2)                  keeps the encoder close to its codes
    L_entropy  = H_sample - H_batch                           LlamaGen `compute_entropy_loss`, T = 0.01:
        a_nk      = -||z_n - e_k||^2 / T                      affinities of every latent n to every code k
        p_nk      = softmax_k(a_nk)
        H_sample  = -mean_n sum_k p_nk log p_nk               (low: every latent commits to one code)
        pbar_k    = mean_n p_nk
        H_batch   = -sum_k pbar_k log(pbar_k + 1e-5)          (high: the batch spreads over the codebook)

    L = recon_weight * L_rec + codebook_weight * L_codebook + L_commit + entropy_weight * L_entropy

Because of the straight-through, L_rec sends gradient to the decoder, `post_quant_conv` and (through `z`)
the encoder, but none to the codebook; the codebook is trained only by L_codebook (and L_entropy when
enabled); L_commit trains only the encoder. Metrics also report codebook usage (distinct codes in the
batch / K) and the perplexity exp(-sum_k q_k log q_k) of the hard code histogram q.

Every function is jit-able and differentiable with `jax.value_and_grad` / `nnx.value_and_grad`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unijax.models.emu3_vq import Emu3VQ
from unijax.models.vq import VQModel

Array = jax.Array
sg = jax.lax.stop_gradient

ENTROPY_TEMPERATURE = 0.01


def _wide(x: Array) -> Array:
    """Cast to at least float32 (keeps float64 under x64, upcasts bf16/f16)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------------------------
# Pure loss terms (array in, scalar out), testable against a NumPy reference.
# ----------------------------------------------------------------------------------------------

def straight_through(z: Array, zq: Array) -> Array:
    """Forward value `zq`, gradient of the identity w.r.t. `z` and none w.r.t. `zq`."""
    return z + sg(zq - z)


def reconstruction_loss(recon: Array, target: Array, kind: str = "l2") -> Array:
    """mean((recon - target)^2) for "l2", mean(|recon - target|) for "l1"."""
    diff = _wide(recon) - _wide(target)
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ValueError(f"recon must be 'l2' or 'l1', got {kind!r}")


def codebook_loss(z: Array, zq: Array) -> Array:
    """mean((sg(z) - zq)^2): gradient to the codebook only."""
    return jnp.mean(jnp.square(sg(z) - zq))


def commitment_loss(z: Array, zq: Array, beta: float = 0.25) -> Array:
    """beta * mean((z - sg(zq))^2): gradient to the encoder only."""
    return beta * jnp.mean(jnp.square(z - sg(zq)))


def code_affinity(z: Array, book: Array) -> Array:
    """Negative squared distances `-||z_n - e_k||^2`: z `[..., D]`, book `[K, D]` -> `[N, K]`."""
    zf = z.reshape(-1, z.shape[-1])
    d = (jnp.sum(zf**2, axis=-1, keepdims=True) + jnp.sum(book**2, axis=-1)
         - 2.0 * jnp.einsum("nd,kd->nk", zf, book))
    return -d


def entropy_loss(affinity: Array, temperature: float = ENTROPY_TEMPERATURE) -> Array:
    """LlamaGen `compute_entropy_loss(affinity, "softmax", temperature)`: sample entropy - batch entropy."""
    a = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = jax.nn.softmax(a, axis=-1)
    log_probs = jax.nn.log_softmax(a + 1e-5, axis=-1)  # the +1e-5 is LlamaGen's (a no-op under softmax)
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    return sample_entropy - avg_entropy


def code_stats(codes: Array, num_codes: int) -> tuple[Array, Array]:
    """(usage, perplexity) of the hard codes: distinct codes / num_codes, exp(entropy of the histogram)."""
    counts = jnp.bincount(codes.reshape(-1), length=num_codes).astype(jnp.result_type(float))
    usage = jnp.sum(counts > 0).astype(counts.dtype) / num_codes
    p = counts / jnp.sum(counts)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return usage, jnp.exp(-jnp.sum(plogp))


# ----------------------------------------------------------------------------------------------
# Model-level forward and loss.
# ----------------------------------------------------------------------------------------------

def vq_forward(vq: VQModel | Emu3VQ, pixels: Array) -> tuple[Array, dict[str, Array]]:
    """pixels `[B, H, W, C]` in [-1, 1] -> (recon `[B, H, W, C]`, aux).

    aux: `z` (the latents in the codebook's space, `vq.latent_space`: L2-normalised for Janus, float32
    `[B, h, w, D]`), `zq` (their codebook entries, same shape, differentiable w.r.t. the codebook),
    `codes` (int32 `[B, h*w]`, the codes of `vq.encode(pixels)`, flattened).
    The decoder sees the straight-through `z + sg(zq - z)`, whose value is `zq`.
    """
    z_raw = vq.encode_latents(pixels)
    codes, zq = vq.quantize_latents(z_raw)  # exactly the path of `vq.encode`
    z = vq.latent_space(z_raw)
    recon = vq.decode_quantized(straight_through(z, zq))
    return recon, {"z": z, "zq": zq, "codes": codes.astype(jnp.int32)}


def vq_losses(vq: VQModel | Emu3VQ, pixels: Array, *, beta: float = 0.25, entropy_weight: float = 0.0,
              recon: str = "l2", recon_weight: float = 1.0, codebook_weight: float = 1.0,
              entropy_temperature: float = ENTROPY_TEMPERATURE) -> tuple[Array, dict[str, Array]]:
    """Total VQ loss and metrics for a batch `pixels [B, H, W, C]` in [-1, 1] (see the module docstring).

    loss = recon_weight * L_rec + codebook_weight * L_codebook + beta * mean((z - sg(zq))^2)
           + entropy_weight * L_entropy

    metrics: `loss`, `recon_loss` (unweighted), `codebook_loss` (unweighted), `commit_loss` (includes beta,
    as LlamaGen reports it), `entropy_loss` (unweighted; computed for monitoring even when its weight is 0,
    then without gradient), `codebook_usage` (distinct codes in the batch / K), `perplexity`.
    """
    recon_px, aux = vq_forward(vq, pixels)
    z, zq, codes = aux["z"], aux["zq"], aux["codes"]
    l_rec = reconstruction_loss(recon_px, pixels, recon)
    l_cb = codebook_loss(z, zq)
    l_commit = commitment_loss(z, zq, beta)
    book = vq.codebook()
    train_entropy = not (isinstance(entropy_weight, (int, float)) and entropy_weight == 0)
    if not train_entropy:
        z, book = sg(z), sg(book)
    l_ent = entropy_loss(code_affinity(z, book), entropy_temperature)
    loss = recon_weight * l_rec + codebook_weight * l_cb + l_commit
    if train_entropy:
        loss = loss + entropy_weight * l_ent
    usage, perplexity = code_stats(codes, book.shape[0])
    metrics = {"loss": loss, "recon_loss": l_rec, "codebook_loss": l_cb, "commit_loss": l_commit,
               "entropy_loss": l_ent, "codebook_usage": usage, "perplexity": perplexity}
    return loss, metrics
