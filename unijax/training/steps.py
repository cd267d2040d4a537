"""The pure train step `(state, frozen, batch) -> (state, metrics)` and the objectives it can
optimise (held-out evaluation: `unijax.training.evaluators`).

`state` is `{"step", "params" (trainable, pure dict), "opt_state", "rng"}`; `frozen` holds the
other parameters, which get no gradient and no optimizer state. The loop jits the step with
explicit in/out shardings and donates `state`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unijax.models import forward, lora
from unijax.sharding import constrain
from unijax.training import aia, losses, vq_loss

OBJECTIVES = ("lm", "vq")  # objective: next-token on both tasks | stage 0 (the VQ tokenizer)


def objective(config, images_per_row: tuple[int, int], num_layers: int = 0):
    """-> (loss_fn(model, batch, whole=None) -> (loss, metrics), eval_fn(model, batch) -> per-row
    metrics). `whole`: the update's batch when `batch` is one micro-batch of it."""
    if config.objective == "lm":
        loss_fn = functools.partial(losses.lm_loss, images_per_row=images_per_row,
                                    text_weight=config.loss.text_weight, image_weight=config.loss.image_weight,
                                    group_weight=config.loss.group_weight,
                                    balance_weight=config.loss.balance_weight, z_weight=config.loss.z_weight,
                                    aia=aia.settings(config, num_layers), chunk_size=config.loss.chunk_size)
        return loss_fn, functools.partial(losses.lm_eval, images_per_row=images_per_row, chunk_size=config.loss.chunk_size)
    if config.objective == "vq":
        def vq_fn(model, batch, whole=None):
            images = forward.generated_images(model.cfg, batch, images_per_row[1])
            loss, metrics = vq_loss.vq_losses(model.vqmodel, images, beta=config.loss.vq_beta,
                                              entropy_weight=config.loss.vq_entropy_weight)
            metrics = dict(metrics)
            if whole is not None:  # a micro-batch: its share of the update's rows (the terms are means over images)
                share = batch["segment_ids"].shape[0] / whole["segment_ids"].shape[0]
                loss = loss * share
                metrics.update({k: v * share for k, v in metrics.items() if k.startswith("loss")})
            metrics["loss"] = loss
            metrics["tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
            return loss, metrics
        return vq_fn, None
    raise ValueError(f"objective={config.objective!r}: expected one of {OBJECTIVES}")


def merged_model(graphdef, params, frozen, lora_scale: float = 1.0, lora_dropout: float = 0.0, rng=None):
    """The model a training state stands for: LoRA adapters (a "lora" entry of `params`;
    `unijax.models.lora`) attached in activation form to the frozen weights they adapt."""
    rest = {k: v for k, v in params.items() if k != "lora"}
    model = nnx.merge(graphdef, rest, frozen)
    if "lora" in params:
        lora.attach(model, params["lora"], lora_scale, lora_dropout, rng)
    return model


def micro_batches(batch: dict, k: int) -> dict:
    """`[B, ...]` -> `[k, B / k, ...]`: micro-batch i holds rows i, i + k, ... so that, with the rows
    split over the batch mesh axes, every micro-batch spans every device (no data moves)."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def accumulated(f: Callable, params, batch: dict, k: int):
    """`jax.value_and_grad(f, has_aux=True)` over `k` micro-batches of `batch`, one after another
    (`f(params, micro, whole, i) -> (loss, metrics)`, `whole` = `batch`): gradients
    summed in float32, additive metrics (`losses.additive`) summed, the others averaged. With
    k = 1 it is the plain value_and_grad of the whole batch."""
    if k == 1:
        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params, batch, None, 0)
        return metrics, grads
    def body(acc, xs):
        i, micro = xs
        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params, micro, batch, i)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, stacked = jax.lax.scan(body, zeros, (jnp.arange(k), micro_batches(batch, k)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics = {key: jnp.sum(v, 0) if losses.additive(key) else jnp.mean(v, 0) for key, v in stacked.items()}
    return metrics, grads


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, schedule: optax.Schedule,
                    lora_scale: float = 1.0, lora_dropout: float = 0.0, grad_accum_steps: int = 1):
    """`grad_accum_steps = k`: the batch runs as k micro-batches whose gradients sum to the whole
    batch's (`accumulated`), one optimizer update; activations are those of one micro-batch."""
    def train_step(state, frozen, batch):
        def f(params, micro, whole, i):
            rng = jax.random.fold_in(state["rng"], i) if grad_accum_steps > 1 else state["rng"]
            model = merged_model(graphdef, params, frozen, lora_scale, lora_dropout, rng)
            return loss_fn(model, micro) if whole is None else loss_fn(model, micro, whole=whole)

        metrics, grads = accumulated(f, state["params"], batch, grad_accum_steps)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
        rng, _ = jax.random.split(state["rng"])
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, metrics

    return train_step
