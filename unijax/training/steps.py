"""The pure train step `(state, frozen, batch) -> (state, metrics)`, for any objective's loss
(`unijax.training.objectives`; held-out evaluation: `unijax.training.evaluators`).

`state` is `{"step", "params" (trainable, pure dict), "opt_state", "rng"}`; `frozen` holds the
other parameters, which get no gradient and no optimizer state, and, for an objective that compares
against its starting model (`Objective.uses_reference`), that model: the same network with the LoRA
adapters off, or a frozen copy of the trainable parameters' start (`frozen[REFERENCE]`). The loop
jits the step with explicit in/out shardings and donates `state`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unijax.models import lora
from unijax.sharding import constrain
from unijax.training import losses

REFERENCE = "reference"  # `frozen[REFERENCE]`: the objective's frozen copy of the trainable parameters' start


def without_reference(frozen: dict) -> dict:
    """The frozen model parameters, without the objective's reference copy (`REFERENCE`)."""
    return {k: v for k, v in frozen.items() if k != REFERENCE}


def merged_model(graphdef, params, frozen, lora_scale: float = 1.0, lora_dropout: float = 0.0, rng=None):
    """The model a training state stands for: LoRA adapters (a "lora" entry of `params`;
    `unijax.models.lora`) attached in activation form to the frozen weights they adapt."""
    rest = {k: v for k, v in params.items() if k != "lora"}
    model = nnx.merge(graphdef, rest, without_reference(frozen))
    if "lora" in params:
        lora.attach(model, params["lora"], lora_scale, lora_dropout, rng)
    return model


def reference_model(graphdef, params, frozen):
    """The frozen starting point of a run: the model with the LoRA adapters off, its other trainable
    parameters from the frozen copy `frozen[REFERENCE]` when there is one. No gradient reaches it."""
    rest = frozen.get(REFERENCE)
    if rest is None:
        rest = {k: v for k, v in params.items() if k != "lora"}
    return nnx.merge(graphdef, jax.lax.stop_gradient(rest), without_reference(frozen))


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
                    lora_scale: float = 1.0, lora_dropout: float = 0.0, grad_accum_steps: int = 1,
                    reference: bool = False):
    """`grad_accum_steps = k`: the batch runs as k micro-batches whose gradients sum to the whole
    batch's (`accumulated`), one optimizer update; activations are those of one micro-batch.
    `reference`: the loss also gets the frozen starting model (`reference_model`)."""
    def train_step(state, frozen, batch):
        def f(params, micro, whole, i):
            rng = jax.random.fold_in(state["rng"], i) if grad_accum_steps > 1 else state["rng"]
            model = merged_model(graphdef, params, frozen, lora_scale, lora_dropout, rng)
            kw = {} if whole is None else {"whole": whole}
            if reference:
                kw["reference"] = reference_model(graphdef, state["params"], frozen)
            return loss_fn(model, micro, **kw)

        metrics, grads = accumulated(f, state["params"], batch, grad_accum_steps)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
        rng, _ = jax.random.split(state["rng"])
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, metrics

    return train_step
