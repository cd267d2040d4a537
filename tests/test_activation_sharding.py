"""Activation sharding constraints (`unijax.sharding.constrain`, the `activation_*` rules): the real
train step of a scanned, rematerialised tiny model on an fsdp=4 x tensor=2 mesh. The lowered
program pins the residual stream's rows to `fsdp`; in the partitioned program every residual
activation holds its device's quarter of the batch (unconstrained, XLA all-reduces whole-batch
activations over `fsdp` from the embed-sharded weights: that program fails the shape check); the
step's loss and gradients equal the one-device step's."""

import re

import envs
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from unijax import sharding
from unijax.contract import GEN_IMAGE, MMU, T2I, TEXT, UND_IMAGE
from unijax.data import pipeline
from unijax.models import family
from unijax.training import objectives
from unijax.training import setup as train_setup
from unijax.training.loop import model_config

B = 8  # rows: 2 per fsdp shard


def config(**mesh):
    c = base.get_config()
    c.data.update(envs.SHORT_ROWS)
    c.model.text.num_layers = 2
    c.model.update(scan_layers=True, remat_policy="full")  # the recipes' layer loop
    c.train.batch_size = B
    c.mesh.update(data=1, **mesh)
    return c


def synthetic_batch(layout, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Even rows understanding (an image after BOS), odd rows generation (an image after a prompt),
    the last 8 slots padding; random tokens and pixels."""
    rng = np.random.default_rng(seed)
    t = layout.max_len
    modality = np.full((B, t), TEXT, np.int32)
    modality[0::2, 1:1 + layout.und_tokens] = UND_IMAGE
    modality[1::2, 9:9 + layout.gen_tokens] = GEN_IMAGE
    segment = np.ones((B, t), np.int32)
    segment[:, -8:] = 0
    valid = segment > 0
    text = (modality == TEXT) & valid
    return {
        "tokens": rng.integers(6, vocab, (B, t)).astype(np.int32) * text,
        "modality": modality,
        "task": np.where(np.arange(B)[:, None] % 2, T2I, MMU).astype(np.int32) * np.ones((1, t), np.int32),
        "text_weights": text.astype(np.float32),
        "image_weights": ((modality == GEN_IMAGE) & valid).astype(np.float32),
        "patches": rng.integers(0, 256, (B, t, layout.patch_dim)).astype(np.uint8),
        "bad": np.zeros((B, t), np.int32),
        "segment_ids": segment,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (B, t)) * valid,
    }


def one_step(c, devices) -> dict:
    """One real train step: the compiled step, its lowered StableHLO text, the metrics, AdamW's first
    moments (0.1 x the clipped gradients) and the residual's (seq, embed)."""
    cfg = model_config(c)
    layout = pipeline.Layout.for_data(cfg, c.data)
    mesh = sharding.make_mesh(c.mesh, devices)
    setup = train_setup.build(family.build(cfg, nnx.Rngs(0)), c, mesh)
    loss_fn, _ = objectives.functions(c, layout.images_per_row(c.data.packing), cfg.text.num_layers)
    step = train_setup.jit_train_step(setup, c, mesh, loss_fn)
    batch = jax.device_put(synthetic_batch(layout, cfg.text.vocab_size), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        lowered = step.lower(setup.state, setup.frozen, batch)
        compiled = lowered.compile()
        state, metrics = compiled(setup.state, setup.frozen, batch)
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    return {"compiled": compiled, "lowered": lowered.as_text(), "metrics": jax.device_get(metrics),
            "mu": jax.device_get(mu), "seq_embed": (layout.max_len, cfg.text.hidden_size)}


@pytest.fixture(scope="module")
def sharded():
    return one_step(config(fsdp=4, tensor=2), jax.devices()[:8])


def test_residual_stream_is_split_over_fsdp_in_the_compiled_step(sharded):
    lowered, (t, e) = sharded["lowered"], sharded["seq_embed"]
    # the constraints: [batch, seq, embed] with the batch over fsdp (embed replicated)
    pinned = re.findall(r'sdy\.sharding_constraint [^ ]+ <@mesh, \[\{"fsdp"\}, \{\}, \{\}\]> : '
                        rf"tensor<{B}x{t}x{e}xf32>", lowered)
    assert len(pinned) >= 8, lowered.count("sharding_constraint")
    # the text logits: one chunk of loss positions per batch shard (shards over fsdp), vocab over tensor
    assert re.search(r'<@mesh, \[\{"fsdp"\}, \{\}, \{"tensor"\}\]> : tensor<4x\d+x', lowered)
    # partitioned: residual activations are [B/4, seq, embed] per device, never the whole batch
    hlo = sharded["compiled"].as_text()
    assert f"f32[{B // 4},{t},{e}]" in hlo and f"f32[{B},{t},{e}]" not in hlo


def test_sharded_loss_and_gradients_match_one_device(sharded):
    """fsdp=4 x tensor=2 vs one device: the loss metrics and the gradients (AdamW's first moment after
    one step is 0.1 x the clipped gradient), float32, rtol 1e-5 (gradients: atol 1e-5 x their
    largest magnitude, for entries that cancel to near zero)."""
    ref = one_step(config(), jax.devices()[:1])
    metrics, mu, ref_metrics, ref_mu = sharded["metrics"], sharded["mu"], ref["metrics"], ref["mu"]
    for key in ("loss", "loss_text", "loss_image", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref_mu))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(mu), jax.tree.leaves(ref_mu)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
