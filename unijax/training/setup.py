"""The sharded training state and the jitted train step, built once for `train()` and `unijax.plan`.

`build(model, config, mesh)` splits the model into trainable and frozen parameters, adds LoRA
adapters, holds the frozen parameters in `train.frozen_dtype` (bf16 for the Janus-Pro recipes: they
get no gradient and no optimizer state, and are computed in the model's dtype anyway), builds the
optax optimizer and places everything with explicit shardings (moments
shard like their parameters). With `abstract=True` (a model from `nnx.eval_shape`) nothing is
allocated: every leaf is a `jax.ShapeDtypeStruct` carrying its sharding, which is what the plan
command lowers and compiles for a mesh of devices that need not exist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from unijax import contract, sharding
from unijax.models import lora
from unijax.training import steps
from unijax.training.optimizer import learning_rate, make_optimizer
from unijax.training.params import split_trainable


@dataclasses.dataclass
class Setup:
    graphdef: Any
    tx: optax.GradientTransformation
    state: dict          # {"step", "params" (trainable, with a "lora" entry when adapted), "opt_state", "rng"}
    state_sh: dict
    frozen: dict         # the other parameters: no gradient, no optimizer state
    frozen_sh: dict
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    reference: bool = False  # the loss gets the frozen starting model (`steps.reference_model`)


def _place(tree, shardings, abstract: bool):
    if abstract:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return jax.device_put(tree, shardings)


def _cast(x, dtype):
    """A floating array (or ShapeDtypeStruct) in `dtype`, its sharding kept; other dtypes as they are."""
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)


def build(model: nnx.Module, config, mesh: Mesh, *, abstract: bool = False, reference: bool = False) -> Setup:
    """Consumes `model` (real, or abstract from `nnx.eval_shape` with `abstract=True`). `reference`:
    the objective compares against the starting model. With LoRA adapters and nothing else trainable
    that is the same network with the adapters off (nothing more in memory); otherwise the trainable
    parameters' starting values are kept in `frozen[steps.REFERENCE]`, sharded like them (in
    `train.frozen_dtype`), and `plan` counts them with the frozen parameters."""
    graphdef, train_state, frozen_state = split_trainable(model, config.train.trainable, config.train.frozen,
                                                          adapters=bool(config.model.lora.rank))
    params_sh = nnx.to_pure_dict(sharding.state_shardings(train_state, mesh))
    frozen_sh = nnx.to_pure_dict(sharding.state_shardings(frozen_state, mesh))
    params = _place(nnx.to_pure_dict(train_state), params_sh, abstract)
    frozen = _place(nnx.to_pure_dict(frozen_state), frozen_sh, abstract)
    lcfg = config.model.lora
    if lcfg.rank:  # adapters on the frozen matrices that model.lora.targets selects; they train, the base does not
        key = jax.random.PRNGKey(config.seed + 2)
        if abstract:
            adapters = jax.eval_shape(lambda f: lora.init(f, lcfg.targets, lcfg.rank, key)[0], frozen)
            adapter_sh = lora.adapter_shardings(frozen, lcfg.targets, frozen_sh)
        else:
            adapters, adapter_sh = lora.init(frozen, lcfg.targets, lcfg.rank, key, frozen_sh)
        params, params_sh = dict(params, lora=_place(adapters, adapter_sh, abstract)), dict(params_sh, lora=adapter_sh)

    rest = {k: v for k, v in params.items() if k != "lora"}
    if reference and rest:  # a copy of the start of what trains (not the adapters)
        frozen = dict(frozen, **{steps.REFERENCE: jax.tree.map(lambda x: x if abstract else jnp.array(x, copy=True), rest)})
        frozen_sh = dict(frozen_sh, **{steps.REFERENCE: {k: params_sh[k] for k in rest}})
    frozen_dtype = config.train.get("frozen_dtype", "")
    if frozen_dtype:  # after the adapters are drawn (they take their weight's dtype, and train)
        frozen = jax.tree.map(lambda x: _cast(x, jnp.dtype(frozen_dtype)), frozen)
    tx = make_optimizer(config.train)
    repl = sharding.replicated(mesh)
    # optimizer moments shard like their parameters; counts and other scalars are replicated
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), params_sh,
                                   transform_non_params=lambda _: repl)
    state_sh = {"step": repl, "params": params_sh, "opt_state": opt_sh, "rng": repl}
    if abstract:
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl), "params": params,
                 "opt_state": _place(jax.eval_shape(tx.init, params), opt_sh, True),
                 "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)}
    else:
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params),
                 "rng": jax.random.PRNGKey(config.seed)}
        state = jax.device_put(state, state_sh)
    return Setup(graphdef, tx, state, state_sh, frozen, frozen_sh,
                 lora.scale_of(lcfg) if lcfg.rank else 1.0, float(lcfg.dropout) if lcfg.rank else 0.0, reference)


def jit_train_step(setup: Setup, config, mesh: Mesh, loss_fn, batch_keys: Sequence[str] = contract.BATCH_KEYS):
    """The jitted `(state, frozen, batch) -> (state, metrics)` with explicit shardings (`batch`: the
    arrays `batch_keys`, split over the batch axes); `state` is donated."""
    batch_sh = {k: sharding.batch_sharding(mesh) for k in batch_keys}
    accum = int(config.train.get("grad_accum_steps", 1))
    if accum > 1:
        sharding.check_batch("train.batch_size / train.grad_accum_steps", config.train.batch_size // accum, mesh)
    step = steps.make_train_step(setup.graphdef, setup.tx, loss_fn, learning_rate(config.train), setup.lora_scale,
                                 setup.lora_dropout, accum, setup.reference)
    return jax.jit(step, in_shardings=(setup.state_sh, setup.frozen_sh, batch_sh),
                   out_shardings=(setup.state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
