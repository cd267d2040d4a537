"""Model internals against the plain full-sequence forward: KV cache, scan, remat, packing,
padding, placeholder filling, logical axes. Tolerance float32: 1e-5 absolute on unit-scale values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unijax.contract import GEN_IMAGE, UND_IMAGE
from unijax.models.decoder import KVCache
from unijax.models.family import preset
from unijax.models.janus import Janus
from unijax.models.vq import VQModel

ATOL = 1e-5


def tiny(**kw):
    return preset("tiny", text={"num_layers": 2}, **kw)


@pytest.fixture(scope="module")
def model():
    return Janus(tiny(), rngs=nnx.Rngs(0))


def mixed_batch(cfg, b=2, t=24, seed=0):
    g = np.random.default_rng(seed)
    tok = g.integers(6, cfg.text.vocab_size, (b, t))
    mod = np.zeros((b, t), np.int64)
    mod[:, t // 2:] = GEN_IMAGE
    tok[:, t // 2:] = g.integers(0, cfg.vq.num_embeddings, (b, t - t // 2))
    return jnp.asarray(tok), jnp.asarray(mod)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_full_forward(scan):
    m = Janus(tiny(scan_layers=scan), rngs=nnx.Rngs(1))
    tok, mod = mixed_batch(m.cfg)
    b, t = tok.shape
    pos, seg = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)
    full, _ = m(tok, mod, pos, seg)
    cache = KVCache.init(m.cfg, b, t + 3)
    k = 10
    run = nnx.jit(lambda m, *a: m(*a[:4], cache=a[4]))
    h, cache = run(m, tok[:, :k], mod[:, :k], pos[:, :k], seg[:, :k], cache)
    steps = [h]
    for i in range(k, t):
        h, cache = run(m, tok[:, i:i + 1], mod[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1], cache)
        steps.append(h)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=ATOL)
    assert int(cache.index) == t


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(model, policy):
    rematted = Janus(tiny(remat_policy=policy), rngs=nnx.Rngs(0))
    tok, mod = mixed_batch(model.cfg)
    b, t = tok.shape
    args = (tok, mod, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32))

    def loss(m):
        return jnp.mean(m.image_logits(m(*args)[0]) ** 2)

    g0 = nnx.grad(loss)(model)
    g1 = nnx.grad(loss)(rematted)
    np.testing.assert_allclose(loss(rematted), loss(model), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, c, atol=1e-6)


def test_packing_equals_separate_sequences(model):
    tok, mod = mixed_batch(model.cfg, b=2, t=12, seed=3)
    sep = [model(tok[i:i + 1], mod[i:i + 1], jnp.arange(12)[None], jnp.ones((1, 12), jnp.int32))[0] for i in range(2)]
    packed_tok = jnp.concatenate([tok[0], tok[1]])[None]
    packed_mod = jnp.concatenate([mod[0], mod[1]])[None]
    pos = jnp.concatenate([jnp.arange(12), jnp.arange(12)])[None]
    seg = jnp.concatenate([jnp.ones(12, jnp.int32), 2 * jnp.ones(12, jnp.int32)])[None]
    packed, _ = model(packed_tok, packed_mod, pos, seg)
    np.testing.assert_allclose(packed[0, :12], sep[0][0], atol=ATOL)
    np.testing.assert_allclose(packed[0, 12:], sep[1][0], atol=ATOL)


def test_padding_does_not_change_real_positions(model):
    tok, mod = mixed_batch(model.cfg, b=1, t=10, seed=4)
    ref, _ = model(tok, mod, jnp.arange(10)[None], jnp.ones((1, 10), jnp.int32))
    pad = 5
    ptok = jnp.concatenate([jnp.zeros((1, pad), tok.dtype), tok], 1)
    pmod = jnp.concatenate([jnp.zeros((1, pad), mod.dtype), mod], 1)
    pos = jnp.concatenate([jnp.zeros(pad, jnp.int32), jnp.arange(10)])[None]
    seg = jnp.concatenate([jnp.zeros(pad, jnp.int32), jnp.ones(10, jnp.int32)])[None]
    out, _ = model(ptok, pmod, pos, seg)
    np.testing.assert_allclose(out[:, pad:], ref, atol=ATOL)
    assert np.isfinite(np.asarray(out)).all()


def test_understanding_features_fill_placeholders_in_order(model):
    cfg = model.cfg
    p = cfg.vision.num_patches
    pixels = jax.random.uniform(jax.random.key(0), (1, 2, 32, 32, 3), minval=-1, maxval=1)
    t = 3 + 2 * p
    mod = jnp.zeros((1, t), jnp.int32).at[0, 1:1 + p].set(UND_IMAGE).at[0, 2 + p:2 + 2 * p].set(UND_IMAGE)
    tok = jnp.where(mod == UND_IMAGE, cfg.image_token_id, 7)
    x = model.embed_inputs(tok, mod, pixels)
    feats = model.image_features(pixels[0])
    np.testing.assert_allclose(x[0, 1:1 + p], feats[0], atol=ATOL)
    np.testing.assert_allclose(x[0, 2 + p:2 + 2 * p], feats[1], atol=ATOL)
    np.testing.assert_allclose(x[0, 0], model.language_model.embed_tokens(tok[:, :1])[0, 0], atol=ATOL)


def test_every_parameter_has_logical_axes_of_its_rank(model):
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == v.get_value().ndim, path
    scanned = Janus(tiny(scan_layers=True), rngs=nnx.Rngs(0))
    for path, v in nnx.to_flat_state(nnx.state(scanned.language_model.layers, nnx.Param)):
        assert v.get_metadata()["out_sharding"][0] == "layers", path


def test_generated_codes_decode_to_a_png_grid(model, tmp_path):
    from PIL import Image

    from unijax.inference.decode import decode_images, generate_image_codes
    from unijax.inference.images import save_grid

    cfg = model.cfg
    prompt = jnp.array([[cfg.text.bos_token_id, 9, 10, cfg.boi_token_id]] * 4)
    codes = generate_image_codes(model, prompt, jnp.ones_like(prompt), guidance=2.0, rng=jax.random.key(1))
    assert codes.shape == (4, cfg.vq.num_tokens) and int(codes.max()) < cfg.vq.num_embeddings
    pixels = decode_images(model, codes)
    path = save_grid(pixels, tmp_path / "grid.png", cols=2, pad=2)
    img = Image.open(path)
    s = cfg.vq.image_size
    assert img.size == (2 * s + 6, 2 * s + 6) and img.mode == "RGB"


def test_sampled_decoding_with_top_k_1_equals_greedy(model):
    from unijax.inference.decode import Generator
    from unijax.inference.sampling import Sampling

    cfg = model.cfg
    gen = Generator(model)
    prompt = jnp.array([[cfg.text.bos_token_id, 9, 10, 11], [0, cfg.text.bos_token_id, 12, 13]])
    mask = (jnp.arange(4)[None] >= jnp.array([[0], [1]])).astype(jnp.int32)  # second row left-padded
    mod = jnp.zeros_like(prompt)
    greedy = gen.text(prompt, mod, mask, max_new_tokens=6)
    top1 = gen.text(prompt, mod, mask, max_new_tokens=6, sampling=Sampling(temperature=0.7, top_k=1),
                    rng=jax.random.key(3))
    np.testing.assert_array_equal(top1, greedy)
    img_greedy = gen.image_codes(prompt, mask, guidance=2.0, sampling=Sampling(), num_tokens=8)
    img_top1 = gen.image_codes(prompt, mask, guidance=2.0, sampling=Sampling(temperature=1.3, top_k=1),
                               num_tokens=8, rng=jax.random.key(4))
    np.testing.assert_array_equal(img_top1, img_greedy)
    free = gen.image_codes(prompt, mask, guidance=2.0, sampling=Sampling(temperature=1.0), num_tokens=8,
                           rng=jax.random.key(5))
    assert not np.array_equal(free, img_greedy)


def test_local_encoder_codes_depend_on_their_neighbourhood_only():
    """`model.vq.local_encoder`: changing the bottom-right quarter of a 64 px image leaves the
    top-left latents bit-identical (beyond the encoder's ~40 px receptive field), while Janus's
    encoder (whole-image GroupNorm statistics and attention) moves them. Both have the same
    parameters (the local one ignores its attention weights) and the same decoder."""
    q = dataclasses.replace(tiny().vq, image_size=64)
    janus_vq = VQModel(q, rngs=nnx.Rngs(0))
    local_vq = VQModel(dataclasses.replace(q, local_encoder=True), rngs=nnx.Rngs(0))
    a, b = nnx.to_pure_dict(nnx.state(janus_vq)), nnx.to_pure_dict(nnx.state(local_vq))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)
    y = x.at[:, 48:, 48:].set(1.0)
    for vq, moved in ((local_vq, False), (janus_vq, True)):
        za, zb = vq.encode_latents(x)[0, :2, :2], vq.encode_latents(y)[0, :2, :2]
        assert (float(jnp.abs(za - zb).max()) > 1e-4) == moved
    codes = jnp.asarray(np.random.default_rng(1).integers(0, q.num_embeddings, (1, q.num_tokens)))
    np.testing.assert_array_equal(np.asarray(janus_vq.decode(codes)), np.asarray(local_vq.decode(codes)))
