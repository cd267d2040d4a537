"""Gradient accumulation (`train.grad_accum_steps`, unijax/training/steps.py `accumulated`): k
micro-batches per update against one k-times-larger batch, and a run resumed mid-way."""

import jax
import numpy as np
import pytest
from test_train import losses_of, tiny_config

from configs import stage2
from unijax import contract, sharding
from unijax.training import loop, objectives, steps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _stage2_aia(workdir, data_dir, **moe):
    c = stage2.get_config("aia")
    t = tiny_config(workdir, data_dir)
    c.workdir, c.data, c.mesh, c.vision_pretrain = t.workdir, t.data, t.mesh, t.vision_pretrain
    c.train.update(steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_every=1000, warmup_steps=1,
                   async_checkpointing=False)
    c.model.text.num_layers = 2
    c.model.lora.rank = 4
    c.model.lora.dropout = 0.0
    c.moe.update(num_experts_per_group=2, top_k=1, capacity_factor=8.0, **moe)  # room for every token: no drops
    return c


def _grads(run, batch, k):
    s = run.setup
    loss_fn, _ = objectives.functions(run.config, run.setup_images_per_row, run.cfg.text.num_layers)

    def f(params, micro, whole, i):
        return loss_fn(steps.merged_model(s.graphdef, params, s.frozen, s.lora_scale), micro, whole=whole)

    with jax.set_mesh(run.mesh):
        return jax.jit(lambda p, b: steps.accumulated(f, p, b, k))(s.state["params"], batch)


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_micro_batches_equal_one_large_batch(tmp_path, data_dir):
    """TA-MoE + LoRA + AIA, 8 rows as 1 or 4 micro-batches. Without the router balance loss (a
    product of two batch means, which accumulation takes per micro-batch) the loss, the task, router
    and AIA losses equal the one-batch values within 1e-5 and every gradient within 1e-4 of its
    largest entry (float32: the in-group router's gradient peaks near 3e-4, and the two summation
    orders differ by about 1e-8 there, 3e-5 of it). (With it, the in-group routers' gradients differ by
    15-40 % of their largest entry at 2 rows per micro-batch: the balance of 2 rows is another
    statistic than the balance of 8; the other losses stay exact.)"""
    c = _stage2_aia(tmp_path / "run", data_dir)
    c.loss.balance_weight = 0.0
    run = loop.setup(c, devices=jax.devices()[:1])
    from unijax.data import pipeline

    layout = pipeline.Layout.for_data(run.cfg, c.data)
    run.setup_images_per_row = layout.images_per_row(c.data.packing)
    host = next(run.data_iter)
    batch = sharding.put_batch({k: host[k] for k in contract.BATCH_KEYS}, run.mesh)
    m1, g1 = _grads(run, batch, 1)
    g1 = _flat(g1)
    for k in (4,):
        mk, gk = _grads(run, batch, k)
        for key in ("loss_text", "loss_image", "loss_group", "loss_z", "aia_loss_gen", "aia_loss_und", "text_tokens",
                    "image_tokens", "router_acc"):
            np.testing.assert_allclose(float(mk[key]), float(m1[key]), rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(float(mk["loss"]), float(m1["loss"]), rtol=1e-5)
        tol = 1e-4
        for name, v in _flat(gk).items():
            scale = np.abs(g1[name]).max()
            assert np.abs(v - g1[name]).max() <= tol * scale + 1e-12, (k, name, np.abs(v - g1[name]).max(), scale)
    run.ckpts.close()


@pytest.mark.slow
def test_accumulating_run_resumes_mid_run(tmp_path, data_dir):
    """A 4-step stage-2 + AIA run with grad_accum_steps=2, stopped after its step-2 checkpoint and
    resumed: the same losses as the uninterrupted run (rtol 1e-5); micro-batches that do not split
    over the mesh are an error naming the keys."""
    ref = _stage2_aia(tmp_path / "ref", data_dir)
    ref.train.grad_accum_steps = 2
    loop.train(ref, devices=jax.devices()[:1])
    part = _stage2_aia(tmp_path / "part", data_dir)
    part.train.grad_accum_steps = 2
    part.train.steps = 2
    loop.train(part, devices=jax.devices()[:1])
    part.train.steps = 4
    loop.train(part, devices=jax.devices()[:1])
    want, got = losses_of(tmp_path / "ref"), losses_of(tmp_path / "part")
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=str(step))
    bad = _stage2_aia(tmp_path / "bad", data_dir)
    bad.train.grad_accum_steps = 4
    bad.mesh.data = 4
    with pytest.raises(ValueError, match=r"train.batch_size / train.grad_accum_steps=2 is not divisible"):
        loop.train(bad, devices=jax.devices()[:4])
