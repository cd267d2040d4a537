"""Sampling filters against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unijax.inference.sampling import Sampling, filter_logits, sample


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
