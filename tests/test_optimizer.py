"""train.lr_scales: per-parameter-group learning-rate multipliers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from unijax.training.optimizer import make_optimizer, parse_lr_scales


def _updates(train_cfg, params, grads):
    tx = make_optimizer(train_cfg)
    state = tx.init(params)
    for _ in range(3):  # a few steps, so the moments and the schedule are past their first values
        updates, state = tx.update(grads, state, params)
    return updates


def test_lr_scales_multiply_the_matching_updates():
    """A parameter matching `regex=f` gets exactly f times the update it gets without scales
    (rtol 1e-6); others are untouched; the optimizer state has the same structure."""
    params = {"vision_model": {"kernel": jnp.ones((3, 4))}, "language_model": {"kernel": jnp.full((4, 2), 0.5),
                                                                              "scale": jnp.ones((2,))}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), params)
    base = ml_collections.ConfigDict(common.get_config().train.to_dict())
    base.update(warmup_steps=1, steps=10)
    plain = _updates(base, params, grads)
    scaled_cfg = ml_collections.ConfigDict(base.to_dict())
    scaled_cfg.lr_scales = ("vision_model/.*=5", "language_model/scale=0.5")
    scaled = _updates(scaled_cfg, params, grads)
    np.testing.assert_allclose(scaled["vision_model"]["kernel"], 5 * plain["vision_model"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(scaled["language_model"]["scale"], 0.5 * plain["language_model"]["scale"], rtol=1e-6)
    np.testing.assert_array_equal(scaled["language_model"]["kernel"], plain["language_model"]["kernel"])
    assert np.abs(plain["vision_model"]["kernel"]).max() > 0
    assert jax.tree.structure(make_optimizer(scaled_cfg).init(params)) == \
        jax.tree.structure(make_optimizer(base).init(params))
    assert isinstance(make_optimizer(scaled_cfg), optax.GradientTransformation)


@pytest.mark.parametrize("spec", [("vision_model/.*",), ("vision_model/.*=fast",), ("=2",), ("([=2",)])
def test_bad_lr_scales_name_the_key(spec):
    with pytest.raises(ValueError, match="train.lr_scales"):
        parse_lr_scales(spec)


def test_lr_scales_first_match_wins_and_string_form():
    scales = parse_lr_scales("aligner/.*=3,.*kernel=2")
    assert [(r.pattern, f) for r, f in scales] == [("aligner/.*", 3.0), (".*kernel", 2.0)]
