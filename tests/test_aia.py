"""AIA: the lean intensity path against explicit probabilities (values and gradients), its memory,
spans on real batches, the Huber loss against float64 numpy, targets, and the model/loss wiring."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_analyze import quick_model

from configs import base
from unijax import contract
from unijax.contract import GEN_IMAGE, UND_IMAGE
from unijax.data import datasets, pipeline, shapes
from unijax.data.tokenizer import shapes_tokenizer
from unijax.models import forward
from unijax.models.family import preset
from unijax.models.layers import attention
from unijax.training import aia, losses, objectives


def _qkv(b=2, t=160, h=4, kh=2, d=32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.float32)
    seg = np.ones((b, t), int)
    seg[1, t - 40:] = 0                      # padding
    seg[0, t // 2:] = 2                      # a second packed segment
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & (np.arange(t)[None] <= np.arange(t)[:, None])
    keys = jnp.asarray(rng.random((b, t)) < 0.3)
    weights = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
    return q, k, v, jnp.asarray(mask), keys, weights


@pytest.mark.parametrize("impl", ["xla", "chunked", "cudnn"])
def test_lean_mass_equals_explicit_probabilities(impl):
    """Values and gradients w.r.t. q, k and v, against the explicit softmax path (rtol 1e-5, atol
    2e-6); 160 tokens, GQA 4/2 heads, padding and two packed segments."""
    q, k, v, mask, keys, w = _qkv()

    def f(q, k, v, impl, aia_impl):
        out, mass = attention(q, k, v, mask, 0.2, impl, keys, aia_impl)
        return jnp.sum(mass * w) + 0.1 * jnp.sum(out ** 2), (out, mass)

    (_, ref), ref_g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v, "xla", "explicit")
    (_, got), got_g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v, impl, "lean")
    for a, b in zip(jax.tree.leaves((got, got_g)), jax.tree.leaves((ref, ref_g))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    # the explicit reference itself: mass = sum of softmax probabilities over the selected keys
    s = np.einsum("bkgtd,bksd->bkgts", np.asarray(q, np.float64).reshape(2, 160, 2, 2, 32).transpose(0, 2, 3, 1, 4),
                  np.asarray(k, np.float64)) * 0.2
    s = np.where(np.asarray(mask)[:, None, None], s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bkgts,bs->btkg", p, np.asarray(keys, np.float64)).reshape(2, 160, 4)
    live = np.asarray(mask).any(-1)
    np.testing.assert_allclose(np.asarray(ref[1])[live], want[live], rtol=1e-5, atol=1e-6)


def test_lean_path_needs_no_probability_matrix():
    """1,024 tokens: the gradient of (attention + AIA mass) by the lean path on the chunked kernel
    needs well under half the temporary memory of the explicit-probabilities path, and about what
    the chunked kernel needs without AIA."""
    sds = jax.ShapeDtypeStruct
    t = 1024
    args = (sds((1, t, 4, 32), jnp.float32), sds((1, 2, t, 32), jnp.float32), sds((1, 2, t, 32), jnp.float32),
            sds((1, t, t), jnp.bool_), sds((1, t), jnp.bool_))

    def temp_bytes(impl, aia_impl):
        def f(q, k, v, mask, keys):
            out, mass = attention(q, k, v, mask, 0.17, impl, keys if aia_impl else None, aia_impl or "lean")
            return jnp.sum(out) + (jnp.sum(mass) if aia_impl else 0.0)

        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    explicit, lean, plain = temp_bytes("xla", "explicit"), temp_bytes("chunked", "lean"), temp_bytes("chunked", None)
    assert lean < 0.5 * explicit, (lean, explicit)
    assert lean < 1.2 * plain, (lean, plain)


def _np_huber(x, t, d):
    e = np.abs(x - t)
    return np.where(e <= d, 0.5 * e ** 2, d * e - 0.5 * d ** 2)


def test_huber_loss_matches_numpy_float64():
    rng = np.random.default_rng(1)
    i = rng.random((6, 5))
    valid = np.array([True, False, True, True, False])
    targets = aia.Targets(rng.random(6), np.array([0.05, 0.5, 0.1, 0.2, 0.01, 1.0]))
    want = (_np_huber(i, targets.target[:, None], targets.delta[:, None]) * valid).sum() / (6 * valid.sum())
    assert (np.abs(i - targets.target[:, None]) > targets.delta[:, None]).any()   # both branches used
    assert (np.abs(i - targets.target[:, None]) <= targets.delta[:, None]).any()
    got = aia.huber_loss(jnp.asarray(i, jnp.float32), jnp.asarray(valid), targets)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    assert float(aia.huber_loss(jnp.asarray(i, jnp.float32), jnp.zeros(5, bool), targets)) == 0.0


def test_intensity_is_the_query_mean():
    rng = np.random.default_rng(2)
    mass, q = rng.random((3, 2, 7)), rng.random((2, 7)) < 0.5
    want = (mass * q).sum(-1) / q.sum(-1)
    np.testing.assert_allclose(forward.intensities(jnp.asarray(mass, jnp.float32), jnp.asarray(q)), want, rtol=1e-6)


def test_tables_rescale_by_relative_depth(tmp_path):
    t = aia.layer_targets("janus_pro", "gen", 30)
    assert t.target.tolist() == [0.4] * 25 + [0.2] * 5 and t.delta[:10].tolist() == [0.2] * 10
    u = aia.layer_targets("janus_pro", "und", 4)  # reference layers 3, 11, 18, 26
    assert u.target.tolist() == [0.1, 0.15, 0.15, 0.3] and u.delta.tolist() == [0.05] * 4
    assert aia.layer_targets("official", "und", 30).target[20] == 0.15
    assert aia.layer_targets("emu3", "und", 32).target[31] == 0.2
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"task": "und", "mean": [0.1, 0.2, 0.3, 0.4], "std": [0.0] * 4}))
    c = aia.layer_targets(str(path), "und", 4, curve_delta=0.07)
    assert c.target.tolist() == [0.1, 0.2, 0.3, 0.4] and c.delta.tolist() == [0.07] * 4
    with pytest.raises(ValueError, match="layers"):
        aia.layer_targets(str(path), "und", 6)
    with pytest.raises(ValueError, match="'und' curve"):
        aia.layer_targets(str(path), "gen", 4)
    with pytest.raises(ValueError, match="neither a table"):
        aia.layer_targets("janus", "gen", 4)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    tok = shapes_tokenizer(tmp_path_factory.mktemp("data"))
    cfg = preset("tiny")
    c = base.get_config()
    c.data.turns_per_image = 2
    layout = pipeline.Layout.from_model(cfg, 160, 0.5)
    ds, w = datasets.task_datasets(c.data, layout.image_size, 0)
    it = iter(pipeline.batches(ds, w, tokenizer=tok, layout=layout, batch_size=16, seed=0, kinds=shapes.KINDS))
    return tok, cfg, next(it)


def test_spans_follow_the_official_code(batch):
    tok, cfg, b = batch
    keys, queries, valid = forward.spans(b, cfg)
    keys, queries, valid = np.asarray(keys), jax.tree.map(np.asarray, queries), jax.tree.map(np.asarray, valid)
    blanked = 0
    for row in range(16):
        toks, mod, n = b["tokens"][row], b["modality"][row], int(b["segment_ids"][row].sum())
        if b["task"][row, 0] == contract.T2I:
            first = np.flatnonzero(mod == GEN_IMAGE)[0]
            prompt = np.zeros(len(toks), bool)
            prompt[:first - 1] = toks[:first - 1] != tok.pad_id       # text up to, not including, boi
            assert toks[first - 1] == tok.boi_id and toks[0] == tok.bos_id and keys[row, 0]
            np.testing.assert_array_equal(keys[row], prompt)
            np.testing.assert_array_equal(queries["gen"][row], mod == GEN_IMAGE)
            is_blank = prompt[1:].sum() == 0
            blanked += is_blank
            assert valid["gen"][row] == (not is_blank) and not valid["und"][row]
        else:
            np.testing.assert_array_equal(keys[row], mod == UND_IMAGE)
            answer = np.zeros(len(toks), bool)
            answer[1:] = b["text_weights"][row, :-1] > 0
            np.testing.assert_array_equal(queries["und"][row], answer)
            assert answer.sum() >= 2 and valid["und"][row] and not valid["gen"][row]
            after = np.asarray(forward.spans(b, cfg, und_queries="after_image")[1]["und"])[row]
            last_img = np.flatnonzero(mod == UND_IMAGE)[-1]
            np.testing.assert_array_equal(after, (np.arange(len(toks)) > last_img) & (np.arange(len(toks)) < n))
    assert blanked > 0  # cfg_drop_prob 0.5: some prompts blanked
    no_bos = np.asarray(forward.spans(b, cfg, include_bos=False)[0])
    assert not no_bos[:, 0].any()
    assert np.asarray(forward.spans(b, cfg, skip_cfg_blank=False)[2]["gen"]).sum() == \
        (b["task"][:, 0] == contract.T2I).sum()


def test_model_capture_matches_explicit_and_scan(batch):
    """aux["aia"] by the lean path equals the explicit one, layer by layer, with and without
    scanned layers (atol 1e-6); the AIA terms are intensities in (0, 1)."""
    _, cfg, b = batch
    b = {k: jnp.asarray(v) for k, v in b.items() if k in contract.BATCH_KEYS}
    out = {}
    for scan in (False, True):
        model = quick_model(preset("tiny", scan_layers=scan))
        tokens, pixels = forward.prepare_inputs(model, b, (1, 1))
        keys = forward.spans(b, cfg)[0]
        for impl in ("explicit", "lean"):
            _, _, aux = model(tokens, b["modality"], b["positions"], b["segment_ids"], pixels=pixels, task=b["task"],
                              return_aux=True, capture_aia=keys, aia_impl=impl)
            out[scan, impl] = np.asarray(aux["aia"])
    assert out[False, "lean"].shape == (cfg.text.num_layers, 16, 160)
    for scan in (False, True):
        np.testing.assert_allclose(out[scan, "lean"], out[scan, "explicit"], atol=1e-6, err_msg=f"scan={scan}")
    terms = aia.aia_terms(jnp.asarray(out[False, "lean"]), b, cfg,
                          {t: aia.layer_targets("janus_pro", t, 4) for t in forward.AIA_TASKS})
    for t in forward.AIA_TASKS:
        assert 0 < float(terms[f"aia_{t}"]) < 1 and float(terms[f"aia_loss_{t}"]) > 0


def test_loss_adds_the_weighted_aia_terms(batch):
    _, cfg, b = batch
    b = {k: jnp.asarray(v) for k, v in b.items() if k in contract.BATCH_KEYS}
    model = quick_model(cfg)
    c = base.get_config()
    c.loss.update(aia_weight=40.0, aia_gen_weight=5.0)
    settings = aia.settings(c, 4)
    assert settings["weights"] == {"gen": 5.0, "und": 40.0}
    plain, _ = losses.lm_loss(model, b, images_per_row=(1, 1))
    total, m = losses.lm_loss(model, b, images_per_row=(1, 1), aia=settings)
    np.testing.assert_allclose(float(total), float(plain) + 5 * float(m["aia_loss_gen"]) +
                               40 * float(m["aia_loss_und"]), rtol=1e-5)
    assert sorted(k for k in m if k.startswith("aia_curve_gen/")) == [f"aia_curve_gen/{l:02d}" for l in range(4)]
    c.loss.aia_weight, c.loss.aia_gen_weight = 0.0, None
    assert aia.settings(c, 4) is None
    c.loss.aia_weight, c.aia.und_targets = 1.0, "/no/such/curve.json"
    with pytest.raises(ValueError, match="aia.und_targets"):
        aia.settings(c, 4)


@pytest.mark.slow
def test_train_steps_pull_the_curves_to_the_targets(batch):
    """The loop's jitted train step (lean path, configs/aia.py settings): 15 AdamW steps on one
    batch with only the AIA loss weighted cut it below a fifth and move the mean intensities towards
    their targets; gradients reach the attention weights through the indicator channel."""
    from configs import aia as aia_config
    from unijax.training import steps
    from unijax.training.optimizer import learning_rate, make_optimizer

    _, cfg, b = batch
    b = {k: jnp.asarray(v) for k, v in b.items() if k in contract.BATCH_KEYS}
    c = aia_config.get_config()
    c.loss.update(text_weight=0.0, image_weight=0.0, aia_gen_weight=50.0, aia_und_weight=50.0)
    c.train.update(steps=15, warmup_steps=1, learning_rate=3e-3)
    graphdef, params = nnx.split(quick_model(cfg), nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(c.train)
    loss_fn, _ = objectives.functions(c, (1, 1), cfg.text.num_layers)
    step = jax.jit(steps.make_train_step(graphdef, tx, loss_fn, learning_rate(c.train)))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jax.random.PRNGKey(0)}
    history = []
    for _ in range(16):
        state, m = step(state, {}, b)
        history.append(jax.device_get(m))
    first, last = history[0], history[-1]
    total = lambda m: m["aia_loss_gen"] + m["aia_loss_und"]
    assert total(last) < 0.2 * total(first), (total(first), total(last))
    for task, tables in (("gen", [0.4, 0.4, 0.4, 0.2]), ("und", [0.1, 0.15, 0.15, 0.3])):
        gap = lambda m, task=task, tables=tables: np.mean(  # noqa: E731
            np.abs([m[f"aia_curve_{task}/{l:02d}"] - t for l, t in enumerate(tables)]))
        assert gap(last) < 0.5 * gap(first), (task, gap(first), gap(last))
