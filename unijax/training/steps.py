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
from unijax.training import aia, losses, vq_loss

OBJECTIVES = ("lm", "vq")  # objective: next-token on both tasks | stage 0 (the VQ tokenizer)


def objective(config, images_per_row: tuple[int, int], num_layers: int = 0):
    """-> (loss_fn(model, batch) -> (loss, metrics), eval_fn(model, batch) -> per-row metrics)."""
    if config.objective == "lm":
        loss_fn = functools.partial(losses.lm_loss, images_per_row=images_per_row,
                                    text_weight=config.loss.text_weight, image_weight=config.loss.image_weight,
                                    group_weight=config.loss.group_weight,
                                    balance_weight=config.loss.balance_weight, z_weight=config.loss.z_weight,
                                    aia=aia.settings(config, num_layers))
        return loss_fn, functools.partial(losses.lm_eval, images_per_row=images_per_row)
    if config.objective == "vq":
        def vq_fn(model, batch):
            images = forward.generated_images(model.cfg, batch, images_per_row[1])
            loss, metrics = vq_loss.vq_losses(model.vqmodel, images, beta=config.loss.vq_beta,
                                              entropy_weight=config.loss.vq_entropy_weight)
            metrics = dict(metrics)
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


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, schedule: optax.Schedule,
                    lora_scale: float = 1.0, lora_dropout: float = 0.0):
    def train_step(state, frozen, batch):
        def f(params):
            return loss_fn(merged_model(graphdef, params, frozen, lora_scale, lora_dropout, state["rng"]), batch)

        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
        rng, _ = jax.random.split(state["rng"])
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, metrics

    return train_step
