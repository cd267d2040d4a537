"""Vocabulary tiling of the training loss (`loss.chunk_size`; `unijax.training.losses`).

The chunked cross-entropies (the heads applied a chunk of positions at a time, under
`jax.checkpoint`) give the loss, every metric and the gradients of the unchunked path
(`chunk_size=0`, the whole `[B, T, V]` logits) within rtol 1e-5, atol 1e-6, for both model families
and chunk sizes that do and do not divide the row length; and the compiled loss + gradient holds no
float32 `[B, T, V]` buffer, where the unchunked one does; the heads run only on the chunks of
gathered positions that hold a loss.
"""

import re

import envs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_analyze import quick_model

from configs import base
from unijax import checkpoints, contract, sharding
from unijax.data import datasets, pipeline, shapes
from unijax.data.tokenizer import shapes_tokenizer
from unijax.models.family import preset
from unijax.training import losses

T = envs.SHORT_ROWS["max_len"]  # 112 positions per row
CHUNKS = (16, 48)               # 112 = 7 x 16; 48 does not divide it (padded to 144)
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return shapes_tokenizer(tmp_path_factory.mktemp("data"))


def shapes_batch(cfg, tok, batch_size=4):
    """One mixed batch (understanding and generation rows) of the shapes world in `cfg`'s layout."""
    c = base.get_config()
    c.data.update(envs.SHORT_ROWS)
    layout = pipeline.Layout.from_model(cfg, T)
    ds, w = datasets.task_datasets(c.data, layout.image_size, 0)
    b = next(iter(pipeline.batches(ds, w, tokenizer=tok, layout=layout, batch_size=batch_size, seed=0,
                                   kinds=shapes.KINDS)))
    b = {k: jnp.asarray(v) for k, v in b.items() if k in contract.BATCH_KEYS}
    assert float(jnp.sum(b["text_weights"])) > 0 and float(jnp.sum(b["image_weights"])) > 0
    return b


def loss_and_grads(graphdef, params, batch, chunk_size):
    def f(p):
        return losses.lm_loss(nnx.merge(graphdef, p), batch, images_per_row=(1, 1), chunk_size=chunk_size)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


@pytest.mark.parametrize("family, chunks", [("janus", CHUNKS + (512,)), ("emu3", CHUNKS)])
def test_chunked_loss_metrics_and_grads_equal_unchunked(family, chunks, tokenizer):
    """Loss, every metric and the gradient of every parameter with `chunk_size` 16 (divides T = 112),
    48 (does not) and 512 (one chunk, no scan) equal the unchunked path's within rtol 1e-5, atol 1e-6."""
    cfg = preset("tiny", family, text={"num_layers": 1})
    graphdef, params = nnx.split(quick_model(cfg), nnx.Param)
    batch = shapes_batch(cfg, tokenizer)
    (ref_loss, ref_m), ref_g = loss_and_grads(graphdef, params, batch, 0)
    ref_g = dict(jax.tree_util.tree_flatten_with_path(ref_g)[0])
    assert float(ref_m["loss_text"]) > 0 and float(ref_m["loss_image"]) > 0
    for chunk in chunks:
        (loss, m), g = loss_and_grads(graphdef, params, batch, chunk)
        np.testing.assert_allclose(float(loss), float(ref_loss), **TOL)
        assert sorted(m) == sorted(ref_m)
        for k in ref_m:
            np.testing.assert_allclose(np.asarray(m[k]), np.asarray(ref_m[k]), **TOL, err_msg=f"chunk={chunk} {k}")
        g = dict(jax.tree_util.tree_flatten_with_path(g)[0])
        assert g.keys() == ref_g.keys()
        for path, want in ref_g.items():
            np.testing.assert_allclose(np.asarray(g[path]), np.asarray(want), **TOL,
                                       err_msg=f"chunk={chunk} {jax.tree_util.keystr(path)}")


def test_chunked_loss_under_a_mesh(tokenizer):
    """On an fsdp=2 x tensor=2 mesh (the chunk logits' rows over fsdp, the text vocab over tensor), the
    chunked loss and metrics equal the unchunked ones on that mesh within rtol 1e-5, atol 1e-6, the
    gradients within rtol 1e-5, atol 1e-6 x each array's largest magnitude (the partitioned
    reductions differ between the two programs: entries that cancel to near zero move by ~1e-7 of
    their array's scale)."""
    cfg = preset("tiny", text={"num_layers": 1})
    graphdef, params = nnx.split(quick_model(cfg), nnx.Param)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    params = jax.device_put(params, sharding.state_shardings(params, mesh))
    batch = jax.device_put(shapes_batch(cfg, tokenizer), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        (ref_loss, ref_m), ref_g = loss_and_grads(graphdef, params, batch, 0)
        (loss, m), g = loss_and_grads(graphdef, params, batch, CHUNKS[1])
    np.testing.assert_allclose(float(loss), float(ref_loss), **TOL)
    for k in ref_m:
        np.testing.assert_allclose(np.asarray(m[k]), np.asarray(ref_m[k]), **TOL, err_msg=k)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g)):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * max(np.abs(want).max(), 1.0),
                                   err_msg=jax.tree_util.keystr(path))


def test_chunked_eval_equals_unchunked(tokenizer):
    """`lm_eval`'s per-row metrics (argmax hits, first answer token, CE sums) are those of the
    unchunked path (CE sums within rtol 1e-5, atol 1e-6)."""
    cfg = preset("tiny", text={"num_layers": 1})
    model = quick_model(cfg)
    batch = shapes_batch(cfg, tokenizer)
    run = nnx.jit(lambda m, b, chunk: losses.lm_eval(m, b, images_per_row=(1, 1), chunk_size=chunk), static_argnums=2)
    ref, out = run(model, batch, 0), run(model, batch, CHUNKS[1])
    assert sorted(out) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), **TOL, err_msg=k)


def test_compiled_loss_holds_no_float32_vocab_logits():
    """Loss + gradient of a text-only batch (B=2, T=256, vocab 8192): the compiled program of the
    unchunked path has a `f32[2,256,8192]` buffer, the chunked one (64 positions) none."""
    b, t, v = 2, 256, 8192
    cfg = preset("tiny", text={"num_layers": 1, "vocab_size": v})
    graphdef, params = nnx.split(checkpoints.abstract_model(cfg), nnx.Param)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(6, v, (b, t)), "modality": np.zeros((b, t)), "task": np.zeros((b, t)),
             "text_weights": rng.random((b, t)), "image_weights": np.zeros((b, t)),
             "patches": np.zeros((b, t, 3 * cfg.vision.patch_size ** 2)), "bad": np.zeros((b, t)),
             "segment_ids": np.ones((b, t)), "positions": np.broadcast_to(np.arange(t), (b, t))}
    dtypes = {"text_weights": jnp.float32, "image_weights": jnp.float32, "patches": jnp.uint8}
    batch = {k: jax.ShapeDtypeStruct(x.shape, dtypes.get(k, jnp.int32)) for k, x in batch.items()}
    assert sorted(batch) == sorted(contract.BATCH_KEYS)

    def hlo(chunk_size):
        def f(p, bt):
            return losses.lm_loss(nnx.merge(graphdef, p), bt, images_per_row=(0, 0), chunk_size=chunk_size)
        return jax.jit(jax.value_and_grad(f, has_aux=True)).lower(params, batch).compile().as_text()

    full = re.compile(rf"f32\[{b},{t},{v}\]")
    assert full.search(hlo(0))
    chunked = hlo(64)
    assert not full.search(chunked)
    assert re.search(rf"f32\[1,{b * 64},{v}\]", chunked)  # a chunk's logits: one group of rows without a mesh


def test_heads_run_only_on_chunks_with_loss_positions():
    """The text head runs on `ceil(answer positions / (B x chunk))` chunks of the gathered positions
    (counted by a callback in the head), not on the `ceil(T / chunk)` chunks of the rows, and the sums
    equal the whole-logits reference within rtol 1e-5."""
    cfg = preset("tiny", text={"num_layers": 1})
    model = quick_model(cfg)
    rng = np.random.default_rng(0)
    b, t, chunk = 4, 96, 4  # chunks of 4 x 4 = 16 gathered positions
    h = jnp.asarray(rng.normal(size=(b, t, cfg.text.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (b, t)))
    weights = np.zeros((b, t), np.float32)
    weights[0, 40:58] = 1.0  # 18 + 3 + 0 + 20 = 41 answer positions: 3 chunks of 16
    weights[1, 90:93] = 0.5
    weights[3, 10:30] = 1.0
    calls = []

    def head(x):
        jax.debug.callback(lambda: calls.append(1))
        return model.text_logits(x)

    total, count = jax.jit(lambda h: losses.chunked_cross_entropy(h, head, targets, jnp.asarray(weights), chunk))(h)
    assert len(calls) == 3
    want = np.sum(np.asarray(losses.cross_entropy(model.text_logits(h), targets)) * weights)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(count) == weights.sum()
