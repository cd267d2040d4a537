"""Sampling filters against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unijax.inference.sampling import Sampling, filter_logits, filter_rows, sample, sample_rows


def np_filter(logits, top_k, top_p):
    out = logits.astype(np.float64).copy()
    for row in out:
        if top_k:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p < 1:
            order = np.argsort(-row)
            p = np.exp(row[order] - row[order].max())
            p /= p.sum()
            before = np.cumsum(p) - p
            row[order[before >= top_p]] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (8, 0.5), (0, 1.0)])
def test_filters_match_numpy(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    ref = np_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(ours < -1e29, np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ref)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampling_stays_inside_the_filter_and_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32))
    assert (sample(logits, None, Sampling()) == jnp.argmax(logits, -1)).all()
    allowed = np.isfinite(np_filter(np.asarray(logits), 4, 1.0))
    keys = jax.random.split(jax.random.key(0), 200)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(temperature=1.0, top_k=4)))(keys))
    for row in range(3):
        assert allowed[row][draws[:, row]].all()
        assert len(set(draws[:, row])) > 1


def test_per_row_filters_and_draws_match_numpy():
    """`filter_rows` (the server's traced per-row settings) keeps exactly the float64 reference's
    tokens on each row, at the row's temperature; `sample_rows` takes the argmax on greedy rows and
    only kept tokens elsewhere, each row from its own key (independent of its neighbours)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    temperature = np.asarray([0.0, 1.0, 0.7, 1.3, 1.0, 2.0], np.float32)
    top_k = np.asarray([0, 5, 0, 8, 0, 3], np.int32)
    top_p = np.asarray([1.0, 1.0, 0.7, 0.5, 1.0, 0.9], np.float32)
    ours = np.asarray(filter_rows(jnp.asarray(logits), temperature, top_k, top_p))
    for i in range(6):
        t = temperature[i] if temperature[i] > 0 else 1.0
        ref = np_filter(logits[i:i + 1] / np.float64(t), int(top_k[i]), float(top_p[i]))[0]
        np.testing.assert_array_equal(ours[i] < -1e29, np.isinf(ref), err_msg=f"row {i}")
        np.testing.assert_allclose(ours[i][np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)
    keys = jax.random.split(jax.random.key(0), 6)
    draws = np.stack([np.asarray(sample_rows(jnp.asarray(logits), jax.random.split(jax.random.key(s), 6), temperature,
                                             top_k, top_p)) for s in range(200)])
    assert (draws[:, 0] == logits[0].argmax()).all()
    for i in range(1, 6):
        assert np.isin(draws[:, i], np.flatnonzero(ours[i] > -1e29)).all(), i
    one = np.asarray(sample_rows(jnp.asarray(logits[:2]), keys[:2], temperature[:2], top_k[:2], top_p[:2]))
    assert one[1] == np.asarray(sample_rows(jnp.asarray(logits), keys, temperature, top_k, top_p))[1]


def test_per_row_top_p_one_keeps_every_token_of_a_large_vocabulary():
    """top_p = 1 is off exactly (float32 cumulative sums reach 1 before the end of 100k tokens)."""
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 100_000)).astype(np.float32))
    kept = np.asarray(filter_rows(logits, jnp.asarray([1.0, 0.5]), jnp.asarray([0, 0]), jnp.asarray([1.0, 1.0])))
    assert (kept > -1e29).all()
