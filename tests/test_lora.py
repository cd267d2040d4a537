"""LoRA adapters (unijax/models/lora.py), parameter labels and the optimizer state they leave,
and a stage-2 style run (TA-MoE, frozen base, LoRA rank 4, routers trained)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_analyze import quick_model
from test_train import losses_of, tiny_config

from configs import stage2
from unijax import checkpoints
from unijax.models import lora
from unijax.models.presets import preset
from unijax.training import loop
from unijax.training import setup as train_setup
from unijax.training.params import count, split_trainable


def moe_cfg():
    return preset("tiny", text={"num_layers": 2}, ffn="ta_moe", moe={"num_experts_per_group": 2, "top_k": 1})


@pytest.fixture(scope="module")
def frozen():
    return nnx.to_pure_dict(nnx.state(quick_model(moe_cfg()), nnx.Param))


def flat(tree):
    return {lora.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_targets_select_attention_experts_and_shared(frozen):
    paths = lora.selected(frozen, lora.DEFAULT_TARGETS)
    for layer in (0, 1):
        for name in ("q", "k", "v", "o"):
            assert f"language_model/layers/{layer}/self_attn/{name}_proj/kernel" in paths
        for name in ("gate", "up", "down"):
            assert f"language_model/layers/{layer}/mlp/experts/{name}_proj" in paths
            assert f"language_model/layers/{layer}/mlp/shared/{name}_proj/kernel" in paths
    assert not any("router" in p or "vision" in p or "embed" in p for p in paths)
    with pytest.raises(ValueError, match="'language_model/.*/qproj/kernel' matches no weight"):
        lora.selected(frozen, ("language_model/.*/qproj/kernel",))


def test_fresh_adapters_change_nothing_and_are_per_expert(frozen):
    adapters, _ = lora.init(frozen, lora.DEFAULT_TARGETS, 4, jax.random.PRNGKey(0))
    ad = adapters["language_model"]["layers"][0]["mlp"]["experts"]["gate_proj"]
    e, d, f = frozen["language_model"]["layers"][0]["mlp"]["experts"]["gate_proj"].shape
    assert ad["a"].shape == (e, d, 4) and ad["b"].shape == (e, 4, f) and not np.any(np.asarray(ad["b"]))
    same = flat(lora.apply(frozen, adapters, 8.0))
    for k, v in flat(frozen).items():
        np.testing.assert_array_equal(same[k], v, err_msg=k)  # B = 0: bit for bit


def test_merged_weights_equal_the_unmerged_adapter_path(frozen):
    """x @ merge(W) == x @ W + (alpha / r) (x @ A) @ B per matrix and per expert, against float64
    numpy (rtol 1e-5); dropout masks are deterministic in the rng and drop whole rows of A."""
    adapters, _ = lora.init(frozen, lora.DEFAULT_TARGETS, 4, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), adapters)
    merged = lora.merge(frozen, adapters, 2.0)
    x = rng.normal(size=(5, 128))
    for path in ("language_model/layers/1/self_attn/q_proj/kernel", "language_model/layers/0/mlp/experts/up_proj"):
        w = flat(frozen)[path].astype(np.float64)
        a = flat(adapters)[path + "/a"].astype(np.float64)
        b = flat(adapters)[path + "/b"].astype(np.float64)
        got = x @ flat(merged)[path].astype(np.float64)
        want = x @ w + 2.0 * (x @ a) @ b
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=path)
    d1 = lora.apply(frozen, adapters, 2.0, dropout=0.5, rng=jax.random.PRNGKey(3))
    d2 = lora.apply(frozen, adapters, 2.0, dropout=0.5, rng=jax.random.PRNGKey(3))
    p = "language_model/layers/0/self_attn/v_proj/kernel"
    np.testing.assert_array_equal(flat(d1)[p], flat(d2)[p])
    delta = flat(d1)[p] - flat(frozen)[p]
    dropped = np.all(np.abs(delta) < 1e-7, axis=1)
    assert 0.2 < dropped.mean() < 0.8  # about half the input rows carry no adapter update


def test_unmatched_trainable_regex_names_it():
    model = quick_model(moe_cfg())
    with pytest.raises(ValueError, match=r"train.trainable: 'language_model/.*/mlp/rooter/.\*' matches no"):
        split_trainable(model, ("language_model/.*/mlp/rooter/.*",), ())
    with pytest.raises(ValueError, match="train.frozen: 'vq/.*' matches no"):
        split_trainable(model, (".*",), ("vq/.*",))


@pytest.mark.slow
def test_stage2_run_trains_adapters_and_routers_only(tmp_path, monkeypatch):
    """configs/stage2.py on a fresh tiny TA-MoE model (2 layers, LoRA rank 4, 4 steps): the
    optimizer state holds exactly two moments per adapter / router / alpha entry (none for the
    frozen base), the loss falls, and the exported model is the base with the adapters merged:
    frozen weights no adapter targets are untouched, adapted ones moved."""
    c = stage2.get_config()
    t = tiny_config(tmp_path / "run", tmp_path / "data")
    c.workdir, c.data, c.mesh, c.vision_pretrain = t.workdir, t.data, t.mesh, t.vision_pretrain
    c.train.update(steps=4, batch_size=4, log_every=1, checkpoint_every=4, eval_every=1000, warmup_steps=1,
                   learning_rate=1e-2, async_checkpointing=False)
    c.model.text.num_layers = 2
    c.model.lora.rank = 4
    c.moe.update(num_experts_per_group=2, top_k=1)
    seen = {}
    real_opt, real_init = train_setup.make_optimizer, loop.initial_model

    def spy_optimizer(train_cfg):
        tx = real_opt(train_cfg)

        def init(params):
            state = tx.init(params)
            if isinstance(params, dict):  # (optax.tree_map_params also calls init on a placeholder)
                seen.update(params=count(params), opt=count(state), lora=count(params["lora"]))
            return state

        return tx._replace(init=init)

    def spy_model(*a):
        model = real_init(*a)
        seen["init"] = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return model

    monkeypatch.setattr(train_setup, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(loop, "initial_model", spy_model)
    loop.train(c, devices=jax.devices()[:1])
    assert 2 * seen["params"] <= seen["opt"] <= 2 * seen["params"] + 8  # + the step counters
    assert seen["lora"] > 0.8 * seen["params"]  # adapters dominate the trainable set
    losses = losses_of(tmp_path / "run")
    assert losses[4][0] < losses[1][0]
    out = flat(nnx.to_pure_dict(nnx.state(checkpoints.load_model(tmp_path / "run" / "model"), nnx.Param)))
    assert set(out) == set(seen["init"])
    for k, v in seen["init"].items():
        if k.startswith(("vision_model/", "vqmodel/", "lm_head/")):
            np.testing.assert_array_equal(out[k], v, err_msg=k)
    for k in ("language_model/layers/0/self_attn/q_proj/kernel", "language_model/layers/1/mlp/experts/down_proj",
              "language_model/layers/1/mlp/task_router/kernel"):
        assert not np.array_equal(out[k], seen["init"][k]), k
    # the unmerged adapter directory (a fresh run: with its frozen base) loads to the merged model
    info = __import__("json").loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
    assert info["rank"] == 4 and info["base_model"] == "base" and "language_model/layers/1/mlp/alpha" in info["trained"]
    unmerged = flat(nnx.to_pure_dict(nnx.state(checkpoints.load_model(tmp_path / "run" / "adapters"), nnx.Param)))
    for k, v in out.items():
        np.testing.assert_allclose(unmerged[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
