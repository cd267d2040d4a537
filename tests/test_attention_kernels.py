"""Per-backend attention kernels behind `model.attention_impl` (`unijax.models.layers.attention`):
splash attention (Pallas TPU kernel, run here in Pallas interpret mode) against the explicit XLA
path in float32, the AIA lean mass through the kernel, `auto` resolution on CPU and under a TPU
topology's mesh (compiled for TPU on this CPU host: the splash custom calls, no score matrix), and
the fallbacks. Tolerance float32: atol = rtol = 1e-5 on real (non-padding) queries."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unijax.models import layers
from unijax.models.decoder import KVCache
from unijax.models.family import preset
from unijax.models.janus import Janus

TOL = dict(atol=1e-5, rtol=1e-5)
B, T, H, K, D = 2, 200, 4, 2, 32   # T=200: the kernel pads the sequence to 256 (segment 0) and head dims to 128
SCALE = 0.2


def _inputs(t=T, seed=0):
    """GQA q/k/v, segment ids with two packed segments (row 0) and tail padding (row 1), the mask the
    decoder builds from them, AIA keys and per-query weights (zero on padding queries)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, t, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, t, D)), jnp.float32)
    seg = np.ones((B, t), np.int32)
    seg[0, t // 2:] = 2                   # a second packed segment
    seg[1, t - 40:] = 0                   # padding
    seg = jnp.asarray(seg)
    slots = jnp.arange(t)
    mask = layers.attention_mask(seg, seg, slots, slots)
    keys = jnp.asarray(rng.random((B, t)) < 0.3)
    live = seg > 0
    w_out = jnp.asarray(rng.normal(size=(B, t, H, D)), jnp.float32) * live[..., None, None]
    w_mass = jnp.asarray(rng.normal(size=(B, t, H)), jnp.float32) * live[..., None]
    return q, k, v, seg, mask, keys, w_out, w_mass


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(layers, "SPLASH_INTERPRET", True)


def _value_and_grads(impl, aia_impl, with_keys):
    q, k, v, seg, mask, keys, w_out, w_mass = _inputs()

    def f(q, k, v):
        out, mass = layers.attention(q, k, v, mask, SCALE, impl, keys if with_keys else None, aia_impl, segment_ids=seg)
        loss = jnp.sum(out * w_out) + (jnp.sum(mass * w_mass) if with_keys else 0.0)   # real queries only
        return loss, (out, mass)

    (_, aux), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return aux, grads, np.asarray(seg > 0)


def test_splash_matches_xla_values_and_gradients(interpret):
    """Splash (interpret mode) against the explicit XLA path: outputs on real queries and gradients
    w.r.t. q, k and v at atol = rtol = 1e-5; GQA 4/2 heads, causal, two packed segments, padding,
    a sequence (200) and head dim (32) the kernel pads."""
    (got, _), got_g, live = _value_and_grads("splash", "lean", False)
    (ref, _), ref_g, _ = _value_and_grads("xla", "lean", False)
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(ref)[live], **TOL)
    assert np.isfinite(np.asarray(got)).all()
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, **TOL)


def test_splash_aia_lean_mass_matches_explicit(interpret):
    """The AIA lean mass (indicator channel of v, inside the splash kernel) and the gradient of
    (outputs + mass) w.r.t. q, k, v equal the XLA explicit-probabilities path at atol = rtol = 1e-5."""
    (got_out, got_mass), got_g, live = _value_and_grads("splash", "lean", True)
    (ref_out, ref_mass), ref_g, _ = _value_and_grads("xla", "explicit", True)
    np.testing.assert_allclose(np.asarray(got_mass)[live], np.asarray(ref_mass)[live], **TOL)
    np.testing.assert_allclose(np.asarray(got_out)[live], np.asarray(ref_out)[live], **TOL)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, **TOL)


def test_auto_resolves_to_xla_on_cpu_and_kernels_fall_back():
    """On CPU `auto` is `xla` (bit-identical); explicit AIA on `auto` runs the explicit path; splash
    falls back to xla off TPU without interpret mode, and always without segment ids or with a
    cache (q length != kv length); cudnn falls back to xla off GPU; explicit AIA on a named kernel
    is an error."""
    assert layers.resolve_attention_impl("auto") == "xla"
    assert layers.resolve_attention_impl("splash") == "splash"
    with pytest.raises(ValueError, match="attention_impl"):
        layers.resolve_attention_impl("flash")
    q, k, v, seg, mask, keys, _, _ = _inputs(t=64)
    ref, ref_mass = layers.attention(q, k, v, mask, SCALE, "xla", keys, "explicit")
    for impl, kw in [("auto", {}), ("splash", {"segment_ids": seg}), ("cudnn", {"segment_ids": seg})]:
        out, _ = layers.attention(q, k, v, mask, SCALE, impl, None, **kw)
        np.testing.assert_array_equal(out, ref)
    out, mass = layers.attention(q, k, v, mask, SCALE, "auto", keys, "explicit")
    np.testing.assert_array_equal(mass, ref_mass)
    with pytest.raises(ValueError, match="explicit AIA"):
        layers.attention(q, k, v, mask, SCALE, "splash", keys, "explicit", segment_ids=seg)
    # a cache: 3 new queries over 64 slots -> xla even in interpret mode
    layers_interpret, layers.SPLASH_INTERPRET = layers.SPLASH_INTERPRET, True
    try:
        out, _ = layers.attention(q[:, -3:], k, v, mask[:, -3:], SCALE, "splash", None, segment_ids=seg[:, -3:])
        np.testing.assert_array_equal(out, layers.dot_product_attention(q[:, -3:], k, v, mask[:, -3:], SCALE))
        out, _ = layers.attention(q, k, v, mask, SCALE, "splash", None)          # no segment ids
        np.testing.assert_array_equal(out, ref)
    finally:
        layers.SPLASH_INTERPRET = layers_interpret


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_is_splash_when_compiled_for_a_tpu_topology(dtype):
    """Traced under a mesh of v5e:2x2 TPU-topology devices, `auto` resolves to splash: the compiled
    TPU program of (attention + AIA lean mass) and its gradient holds the splash custom calls
    (forward, dq, dkv) and no float32 score matrix `[b, K, G, T, S]` / `[b, H, T, S]`. bfloat16 is
    traced under the default matmul precision (Mosaic takes no fp32 contract precision on bf16
    operands; the suite's `highest` is a test setting)."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other processes on this host may hold libtpu
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 2, 1, 1), ("data", "fsdp", "expert", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 4)
    b, t = 4, 256
    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, H, D), dtype), sds((b, K, t, D), dtype), sds((b, K, t, D), dtype),
            sds((b, t), jnp.int32), sds((b, t, t), jnp.bool_), sds((b, t), jnp.bool_))

    def f(q, k, v, seg, mask, keys):
        assert layers.resolve_attention_impl("auto") == "splash"
        out, mass = layers.attention(q, k, v, mask, SCALE, "auto", keys, "lean", segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(mass)

    precision = "default" if dtype == "bfloat16" else jax.config.jax_default_matmul_precision
    with jax.set_mesh(mesh), jax.default_matmul_precision(precision):
        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile()
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 3, text.count("tpu_custom_call")
    for name in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert name in text
    scores = rf"f32\[\d+,{K},{H // K},{t},{t}\]|f32\[\d+,{H},{t},{t}\]"
    assert not re.search(scores, text), re.findall(scores, text)[:3]
    # rows over data x fsdp: each device runs the kernel on its batch row, no collectives
    assert f"[1,{t},{H},{D}]" in text.split("ENTRY", 1)[1].split("\n", 1)[0]


def test_model_with_splash_matches_xla(interpret):
    """A tiny two-layer Janus with `attention_impl=splash` (interpret mode): the same hidden states
    as with `xla` on real tokens (packed rows, padding) through the decoder's segment-id wiring, and
    KV-cache decoding (which falls back to xla) still runs."""
    cfg = preset("tiny", text={"num_layers": 2})
    ref_m = Janus(cfg.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
    got_m = Janus(cfg.replace(attention_impl="splash"), rngs=nnx.Rngs(0))
    g = np.random.default_rng(5)
    b, t = 2, 40
    tok = jnp.asarray(g.integers(6, cfg.text.vocab_size, (b, t)))
    mod = jnp.zeros((b, t), jnp.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, 25:] = 2
    seg[1, 30:] = 0
    pos = np.concatenate([np.arange(25), np.arange(15)])[None].repeat(b, 0)
    pos[1] = np.arange(t)
    run = nnx.jit(lambda m, *a: m(*a)[0])
    ref = run(ref_m, tok, mod, jnp.asarray(pos), jnp.asarray(seg))
    got = run(got_m, tok, mod, jnp.asarray(pos), jnp.asarray(seg))
    live = seg > 0
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(ref)[live], **TOL)
    prefill = nnx.jit(lambda m, *a: m(*a[:4], cache=a[4])[0])(got_m, tok, mod, jnp.asarray(pos), jnp.asarray(seg),
                                                               KVCache.init(cfg, b, t + 4))
    np.testing.assert_allclose(np.asarray(prefill)[live], np.asarray(ref)[live], **TOL)
