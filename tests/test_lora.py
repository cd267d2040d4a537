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
from unijax.models.family import preset
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


# -- the activation form (what training computes) --------------------------------------------------
def _random_adapters(frozen, rank=4, seed=0, targets=lora.DEFAULT_TARGETS):
    adapters, _ = lora.init(frozen, targets, rank, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), adapters)


def _lm_value(graphdef, params, frozen, tokens, task, activation: bool, dropout=0.0, rng=None):
    from unijax.training.steps import merged_model

    if activation:
        model = merged_model(graphdef, params, frozen, 2.0, dropout, rng)
    else:
        model = nnx.merge(graphdef, *lora.materialize(params, frozen, 2.0))
    b, t = tokens.shape
    h, _ = model(tokens, jnp.zeros_like(tokens), jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones_like(tokens),
                 task=task)
    return jnp.mean(model.text_logits(h) ** 2)


@pytest.mark.parametrize("impl,scan", [("capacity", False), ("dropless", True)])
def test_activation_form_equals_merged_weights_and_their_gradients(impl, scan):
    """x W + s (x A) B through Linear (attention, shared expert) and Experts (per-expert adapters,
    batched and ragged dispatch; looped and scanned layers) == the forward of the merged weights
    W + s A B, value and gradients w.r.t. every A and B within rtol 1e-5 (float32)."""
    cfg = preset("tiny", text={"num_layers": 2}, ffn="ta_moe", scan_layers=scan,
                 moe={"num_experts_per_group": 2, "top_k": 1, "impl": impl, "capacity_factor": 4.0})
    graphdef, params, frozen = split_trainable(quick_model(cfg), ("lm_head/.*",), ())
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    params["lora"] = _random_adapters(frozen)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, 500, (2, 12)), jnp.int32)
    task = jnp.asarray([[0] * 12, [1] * 12], jnp.int32)
    grad = jax.value_and_grad(_lm_value, argnums=1)
    v_act, g_act = grad(graphdef, params, frozen, tokens, task, True)
    v_ref, g_ref = grad(graphdef, params, frozen, tokens, task, False)
    np.testing.assert_allclose(float(v_act), float(v_ref), rtol=1e-5)
    g_act, g_ref = flat(g_act["lora"]), flat(g_ref["lora"])
    assert set(g_act) == set(g_ref) and any("experts" in k for k in g_act)
    for k, v in g_ref.items():
        np.testing.assert_allclose(g_act[k], v, rtol=1e-5, atol=1e-5 * np.abs(v).max(), err_msg=k)


def _dot_shapes(jaxpr) -> set:
    """Output shapes of every dot_general in a jaxpr and its sub-jaxprs (remat, scan, pjit)."""
    out = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out |= {tuple(v.aval.shape) for v in eqn.outvars}
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out |= _dot_shapes(inner)
    return out


def test_activation_form_has_no_weight_sized_product_and_drops_per_token():
    """The step's jaxpr has no [in, out] product for an adapted matrix (the weight-level form has
    one per matrix: A @ B and its gradient); dropout masks single tokens (PEFT's lora_dropout):
    two equal tokens at different positions get different adapter outputs, reproducibly per rng."""
    cfg = preset("tiny", text={"num_layers": 1})
    graphdef, params, frozen = split_trainable(quick_model(cfg), ("lm_head/.*",), ())
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    params["lora"] = _random_adapters(frozen, targets=lora.DEFAULT_TARGETS[:2])
    tokens = jnp.full((1, 8), 7, jnp.int32)
    d, f = cfg.text.hidden_size, cfg.text.intermediate_size
    for activation, expect in ((True, False), (False, True)):
        jaxpr = jax.make_jaxpr(jax.grad(_lm_value, argnums=1), static_argnums=(0, 5))(
            graphdef, params, frozen, tokens, None, activation)
        shapes = _dot_shapes(jaxpr.jaxpr)
        assert len(shapes) > 5
        assert ((d, f) in shapes or (f, d) in shapes) == expect, (activation, sorted(shapes))

    from unijax.training.steps import merged_model

    def up_out(rng):
        model = merged_model(graphdef, params, frozen, 2.0, 0.5, rng)
        x = jnp.ones((1, 8, d))
        return np.asarray(model.language_model.layers[0].mlp.up_proj(x))

    base = np.ones((1, 8, d)) @ np.asarray(frozen["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"])
    delta = up_out(jax.random.PRNGKey(3)) - base
    np.testing.assert_array_equal(up_out(jax.random.PRNGKey(3)) - base, delta)
    assert not np.allclose(delta[0, 0], delta[0, 1])  # same input, different tokens: different masks
    assert not np.allclose(up_out(jax.random.PRNGKey(4)) - base, delta)


def test_adapters_equal_peft_with_dropout_off(tmp_path):
    """A converted tiny transformers Janus with PEFT LoRA (r 4, alpha 8, q/k/v/o/gate/up/down) and
    unijax with the same adapters: text logits within 1e-4 x max |ref|, and the gradients of one
    loss w.r.t. every lora_A / lora_B within 1e-4 x max |ref| (float32)."""
    import torch
    from hf_models import make_tiny_janus
    from peft import LoraConfig, get_peft_model

    from unijax.hf.convert import hf_to_checkpoint
    from unijax.training.steps import merged_model

    hf = make_tiny_janus(tmp_path / "hf", gqa=True, seed=3)
    hf_to_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    ours = checkpoints.load_model(tmp_path / "ckpt")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    adapters = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "language_model" in name:
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(0.3 * torch.randn(module.lora_A["default"].weight.shape, generator=gen))
                module.lora_B["default"].weight.copy_(0.3 * torch.randn(module.lora_B["default"].weight.shape, generator=gen))
            layer, kind, proj = name.split("layers.")[1].split(".")
            adapters.setdefault("language_model", {}).setdefault("layers", {}).setdefault(int(layer), {}).setdefault(
                kind, {})[proj] = {"kernel": {"a": jnp.asarray(module.lora_A["default"].weight.detach().numpy().T),
                                              "b": jnp.asarray(module.lora_B["default"].weight.detach().numpy().T)}}
    assert len(flat(adapters)) == 2 * 2 * len(targets)
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 100, 3, 8, 11]])
    logits = peft(input_ids=ids).logits
    weight = torch.randn(logits.shape, generator=gen)
    (logits * weight).sum().backward()

    graphdef, params, frozen = split_trainable(ours, ("lm_head/.*",), ())
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    tok = jnp.asarray(ids.numpy())

    def value(ad):
        model = merged_model(graphdef, dict(params, lora=ad), frozen, 8 / 4)
        h, _ = model(tok, jnp.zeros_like(tok), jnp.arange(tok.shape[1])[None], jnp.ones_like(tok))
        out = model.text_logits(h)
        return jnp.sum(out * jnp.asarray(weight.numpy())), out

    (_, out), grads = jax.value_and_grad(value, has_aux=True)(adapters)
    ref = logits.detach().numpy()
    assert np.abs(np.asarray(out) - ref).max() <= 1e-4 * np.abs(ref).max()
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "language_model" in name:
            layer, kind, proj = name.split("layers.")[1].split(".")
            g = grads["language_model"]["layers"][int(layer)][kind][proj]["kernel"]
            for ours_g, ref_g in ((g["a"], module.lora_A["default"].weight.grad.numpy().T),
                                  (g["b"], module.lora_B["default"].weight.grad.numpy().T)):
                assert np.abs(np.asarray(ours_g) - ref_g).max() <= 1e-4 * np.abs(ref_g).max(), name
