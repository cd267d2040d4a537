"""VQ tokenizer training losses (`unijax.training.vq_loss`): NumPy float64 reference of every term,
straight-through gradient routing, forward == encode/decode, and a short overfitting run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unijax.models.family import preset
from unijax.models.vq import VQModel
from unijax.training import vq_loss as V


def squares(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """`n` NHWC images in [-1, 1]: a flat coloured background with three coloured squares."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        imgs[i] = rng.uniform(-1, 1, 3) * 0.5
        for _ in range(3):
            s = int(rng.integers(6, 16))
            y, x = rng.integers(0, size - s, 2)
            imgs[i, y:y + s, x:x + s] = rng.uniform(-1, 1, 3)
    return imgs


@pytest.fixture(scope="module")
def vq():
    return VQModel(preset("tiny").vq, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# NumPy float64 reference (LlamaGen's VectorQuantizer / compute_entropy_loss, written out).
# ---------------------------------------------------------------------------------------------

def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def np_reference(z, book, recon, target, beta, temperature=0.01):
    zf = z.reshape(-1, z.shape[-1])
    d = ((zf[:, None, :] - book[None, :, :]) ** 2).sum(-1)  # direct squared distances [N, K]
    codes = d.argmin(-1)
    zq = book[codes].reshape(z.shape)
    a = -d / temperature
    log_probs = np_log_softmax(a)
    probs = np.exp(log_probs)
    avg = probs.mean(0)
    entropy = -(probs * log_probs).sum(-1).mean() + (avg * np.log(avg + 1e-5)).sum()
    counts = np.bincount(codes, minlength=book.shape[0])
    p = counts[counts > 0] / counts.sum()
    return dict(
        codes=codes, zq=zq, affinity=-d,
        l2=np.mean((recon - target) ** 2), l1=np.mean(np.abs(recon - target)),
        codebook=np.mean((z - zq) ** 2), commit=beta * np.mean((z - zq) ** 2), entropy=entropy,
        usage=np.count_nonzero(counts) / book.shape[0], perplexity=np.exp(-(p * np.log(p)).sum()))


def random_case(seed=0, b=2, h=4, d=8, k=32):
    rng = np.random.default_rng(seed)
    z = np_normalize(rng.normal(size=(b, h, h, d)))
    book = np_normalize(rng.normal(size=(k, d)))
    target = rng.uniform(-1, 1, (b, 16, 16, 3))
    recon = target + 0.3 * rng.normal(size=target.shape)
    return z, book, recon, target


def jax_terms(z, book, recon, target, beta):
    codes = jnp.argmax(jnp.einsum("bhwd,kd->bhwk", z, book), -1).reshape(z.shape[0], -1)
    zq = book[codes].reshape(z.shape)
    usage, perplexity = V.code_stats(codes, book.shape[0])
    return dict(
        codes=codes.reshape(-1), zq=zq, affinity=V.code_affinity(z, book),
        l2=V.reconstruction_loss(recon, target, "l2"), l1=V.reconstruction_loss(recon, target, "l1"),
        codebook=V.codebook_loss(z, zq), commit=V.commitment_loss(z, zq, beta),
        entropy=V.entropy_loss(V.code_affinity(z, book)), usage=usage, perplexity=perplexity)


# Tolerances: float64 JAX vs float64 NumPy agree to rtol 1e-6 (in practice ~1e-13); float32 JAX vs
# float64 NumPy to rtol 1e-5 (the affinities are absolute differences of O(1) numbers, so atol 1e-5).
@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_loss_terms_match_numpy_float64(x64):
    z, book, recon, target = random_case()
    ref = np_reference(z, book, recon, target, beta=0.25)
    rtol, atol = (1e-6, 1e-12) if x64 else (1e-5, 1e-5)
    with jax.enable_x64(x64):
        dt = jnp.float64 if x64 else jnp.float32
        args = [jnp.asarray(a, dt) for a in (z, book, recon, target)]
        out = jax.jit(jax_terms, static_argnums=4)(*args, 0.25)
        out = jax.tree.map(lambda a: np.asarray(a, np.float64), out)
    np.testing.assert_array_equal(out.pop("codes"), ref.pop("codes"))
    for key, want in ref.items():
        np.testing.assert_allclose(out[key], want, rtol=rtol, atol=atol, err_msg=key)
    assert 0 < ref["usage"] < 1 and ref["perplexity"] > 1  # the case is not degenerate


LOSS_KW = dict(beta=0.3, entropy_weight=0.1, recon="l1", recon_weight=0.7, codebook_weight=1.5)


@pytest.fixture(scope="module")
def outs(vq):
    """One compiled call: `vq_losses`, `vq_forward`, `encode`, `decode` and the explicit decoder path."""
    pixels = jnp.asarray(squares(2, seed=1))

    @nnx.jit
    def run(v, x):
        loss, m = V.vq_losses(v, x, **LOSS_KW)
        recon, aux = V.vq_forward(v, x)
        codes = v.encode(x)
        lookup = v.codebook()[codes].reshape(aux["zq"].shape)
        return dict(pixels=x, loss=loss, metrics=m, recon=recon, aux=aux, codes=codes, lookup=lookup,
                    book=v.codebook(), decoded=v.decode(codes), direct=v.decoder(v.post_quant_conv(lookup)))

    return run(vq, pixels)


def test_model_losses_are_the_pure_terms(outs):
    """`vq_losses` combines the pure terms of `vq_forward`'s outputs with the stated weights."""
    m, aux = outs["metrics"], outs["aux"]

    @jax.jit
    def terms(recon, pixels, z, zq, codes, book):
        l_rec = V.reconstruction_loss(recon, pixels, "l1")
        l_cb = V.codebook_loss(z, zq)
        l_commit = V.commitment_loss(z, zq, 0.3)
        l_ent = V.entropy_loss(V.code_affinity(z, book))
        usage, perplexity = V.code_stats(codes, book.shape[0])
        return dict(recon_loss=l_rec, codebook_loss=l_cb, commit_loss=l_commit, entropy_loss=l_ent,
                    codebook_usage=usage, perplexity=perplexity,
                    loss=0.7 * l_rec + 1.5 * l_cb + l_commit + 0.1 * l_ent)

    want = terms(outs["recon"], outs["pixels"], aux["z"], aux["zq"], aux["codes"], outs["book"])
    for key, w in want.items():
        np.testing.assert_allclose(m[key], w, rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(outs["loss"], m["loss"], rtol=0)
    np.testing.assert_allclose(m["commit_loss"], 0.3 * m["codebook_loss"], rtol=1e-6)  # same value
    np.testing.assert_allclose(np.linalg.norm(np.asarray(aux["z"]), axis=-1), 1.0, rtol=1e-5)
    assert 0 < float(m["codebook_usage"]) <= 1 and float(m["perplexity"]) >= 1


def test_forward_matches_encode_and_decode(outs, vq):
    aux, codes, recon = outs["aux"], outs["codes"], outs["recon"]
    np.testing.assert_array_equal(aux["codes"], codes)
    assert aux["codes"].dtype == jnp.int32 and aux["codes"].shape == (2, vq.grid**2)
    np.testing.assert_array_equal(aux["zq"], outs["lookup"])
    # straight-through: the decoder sees zq's value, so recon == decoder(post_quant_conv(lookup)) == decode
    np.testing.assert_allclose(recon, outs["direct"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(recon, outs["decoded"], atol=1e-5, rtol=1e-5)
    assert recon.shape == outs["pixels"].shape


def _norms(grads) -> dict[str, float]:
    """Global L2 norm of the gradient of each part of the VQ model."""
    parts = dict(encoder=grads["encoder"], quant_conv=grads["quant_conv"], codebook=grads["quantize"],
                 post_quant_conv=grads["post_quant_conv"], decoder=grads["decoder"])
    return {k: float(optax.global_norm(jax.tree.leaves(v))) for k, v in parts.items()}


def test_straight_through_gradient_routing(vq):
    """Gradient of each (unweighted) loss term w.r.t. each part of the model, via one `jax.jacrev`."""
    pixels = jnp.asarray(squares(2, seed=3))
    names = ("recon_loss", "codebook_loss", "commit_loss", "entropy_loss")
    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)

    @jax.jit
    def jac(params, rest, x):
        def terms(p):
            m = V.vq_losses(nnx.merge(graphdef, p, rest), x, entropy_weight=1.0)[1]
            return jnp.stack([m[k] for k in names])
        return jax.jacrev(terms)(params)

    rows = jac(params, rest, pixels)  # every leaf [4, *param_shape]
    n = {name: _norms(jax.tree.map(lambda a, i=i: a[i], rows)) for i, name in enumerate(names)}
    for name, norms in n.items():
        print(name, {k: f"{v:.3e}" for k, v in norms.items()})
    enc = ("encoder", "quant_conv")
    dec = ("post_quant_conv", "decoder")
    # reconstruction: encoder (through the straight-through) and decoder, never the codebook
    assert all(n["recon_loss"][k] > 1e-6 for k in enc + dec)
    assert n["recon_loss"]["codebook"] == 0.0
    # codebook loss: only the codebook
    assert n["codebook_loss"]["codebook"] > 1e-6
    assert all(n["codebook_loss"][k] == 0.0 for k in enc + dec)
    # commitment: only the encoder
    assert all(n["commit_loss"][k] > 1e-6 for k in enc)
    assert n["commit_loss"]["codebook"] == 0.0 and all(n["commit_loss"][k] == 0.0 for k in dec)
    # entropy: encoder and codebook, not the decoder
    assert all(n["entropy_loss"][k] > 1e-6 for k in enc + ("codebook",))
    assert all(n["entropy_loss"][k] == 0.0 for k in dec)


@pytest.mark.slow
def test_short_training_reduces_reconstruction(vq):
    """Adam (lr 1e-3), 60 steps on one batch of 8 coloured-square images: measured recon MSE
    0.465 -> 0.043 (about 10.8x) on CPU; asserted at least 4x."""
    vq = nnx.clone(vq)  # leave the shared fixture untouched
    opt = nnx.Optimizer(vq, optax.adam(1e-3), wrt=nnx.Param)
    x = jnp.asarray(squares(8))

    @nnx.jit
    def step(v, o, x):
        (_, m), g = nnx.value_and_grad(lambda m: V.vq_losses(m, x), has_aux=True)(v)
        o.update(v, g)
        return m

    history = [step(vq, opt, x) for _ in range(61)]  # metrics are computed before each update
    m0, m1 = history[0], history[-1]  # before any update, after 60 updates
    assert all(np.isfinite(float(m["loss"])) for m in history)
    r0, r1 = float(m0["recon_loss"]), float(m1["recon_loss"])
    print(f"recon {r0:.4f} -> {r1:.4f} ({r0 / r1:.1f}x); loss {float(m0['loss']):.4f} -> {float(m1['loss']):.4f};"
          f" usage {float(m1['codebook_usage']):.3f}; perplexity {float(m1['perplexity']):.1f}")
    assert r0 / r1 >= 4.0
