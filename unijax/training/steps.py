"""The pure train step `(state, frozen, batch) -> (state, metrics)`, the objectives it can
optimise, and held-out evaluation.

`state` is `{"step", "params" (trainable, pure dict), "opt_state", "rng"}`; `frozen` holds the
other parameters, which get no gradient and no optimizer state. The loop jits the step with
explicit in/out shardings and donates `state`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unijax import sharding
from unijax.data import datasets, pipeline, shapes
from unijax.models import lora
from unijax.training import aia, losses, vq_loss


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
            images = losses.generated_images(model.cfg, batch, images_per_row[1])
            loss, metrics = vq_loss.vq_losses(model.vqmodel, images, beta=config.loss.vq_beta,
                                              entropy_weight=config.loss.vq_entropy_weight)
            metrics = dict(metrics)
            metrics["loss"] = loss
            metrics["tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
            return loss, metrics
        return vq_fn, None
    raise ValueError(f"objective={config.objective!r}: expected 'lm' or 'vq'")


def merged_model(graphdef, params, frozen, lora_scale: float = 1.0, lora_dropout: float = 0.0, rng=None):
    """The model a training state stands for: LoRA adapters (a "lora" entry of `params`;
    `unijax.models.lora`) applied to the frozen weights they adapt."""
    params, frozen = lora.materialize(params, frozen, lora_scale, lora_dropout, rng)
    return nnx.merge(graphdef, params, frozen)


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


def heldout_batches(config, tokenizer, layout: pipeline.Layout, kinds) -> list[dict]:
    """`train.eval_batches` host batches of held-out shapes scenes (scene seed `config.seed +
    Evaluator.EVAL_SEED_OFFSET`, which the training stream never uses), one question per image."""
    seed = config.seed + Evaluator.EVAL_SEED_OFFSET
    dsets, weights = datasets.task_datasets(config.data, layout.image_size, seed, turns=1)
    ds = pipeline.batches(dsets, weights, tokenizer=tokenizer, layout=layout, batch_size=config.train.batch_size,
                          seed=seed, packing=False, kinds=kinds)
    it = iter(ds)
    return [next(it) for _ in range(config.train.eval_batches)]


def answer_mode_share(first_answers: np.ndarray) -> float:
    """Share of the most frequent predicted first answer token among a kind's questions: 1.0 means
    one answer for every question (the model reads neither the image nor the question's specifics),
    whatever its accuracy happens to be on that slice."""
    _, counts = np.unique(np.asarray(first_answers), return_counts=True)
    return float(counts.max() / counts.sum())


def _gather(tree):
    """Host copies of global per-row results: all-gathered over processes when there are several."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


class Evaluator:
    """Held-out shapes scenes (a seed the training stream never uses), evaluated every
    `train.eval_every` steps.

    lm: understanding accuracy (exact-match answers, overall and per question kind) next to the
    image-blind baseline's (`shapes.blind_baseline`: chance for this question mix), per kind the
    share of its most frequent predicted answer (`answer_mode/<kind>`), and the image-code loss.
    vq: reconstruction error, and the share of reconstructions on which the detector finds exactly
    the scene's objects.
    """

    EVAL_SEED_OFFSET = datasets.HELD_OUT_SEED_OFFSET

    def __init__(self, config, graphdef, eval_fn, tokenizer, layout: pipeline.Layout, mesh, kinds):
        self.config, self.graphdef, self.mesh, self.kinds = config, graphdef, mesh, kinds
        self.seed = config.seed + self.EVAL_SEED_OFFSET
        n = config.train.eval_batches * config.train.batch_size
        self.objective = config.objective
        if self.objective == "lm":
            self.layout = layout
            self.batches = heldout_batches(config, tokenizer, layout, kinds)
            # each process feeds its slice of the rows, as in training (`sharding.put_batch`)
            n_rows, pi, pc = config.train.batch_size, jax.process_index(), jax.process_count()
            rows = slice(pi * n_rows // pc, (pi + 1) * n_rows // pc)
            self.device_batches = [{k: b[k][rows] for k in pipeline.BATCH_KEYS} for b in self.batches]
            scale = lora.scale_of(config.model.lora) if config.model.lora.rank else 1.0
            self._fn = jax.jit(lambda p, f, b: eval_fn(merged_model(graphdef, p, f, scale), b))
            # the image-blind answerer's accuracy on this question mix: the chance level to beat
            blind = dict(shapes.blind_baseline(datasets.question_kinds(config.data) or None, seed=self.seed,
                                               fit=10000, held_out=2000))
            self.blind = {"blind_accuracy": blind.pop("accuracy")}
            self.blind.update({f"blind/{k}": v for k, v in blind.items()})
        else:
            size = layout.image_size
            self.scenes = [shapes.scene_at(self.seed, i, size) for i in range(n)]
            self.images = np.stack([shapes.render(s) for s in self.scenes]).astype(np.float32) / 127.5 - 1

            def recon(p, f, x):
                vq = merged_model(graphdef, p, f).vqmodel
                r, _ = vq_loss.vq_forward(vq, x)
                return r

            self._fn = jax.jit(recon)

    def __call__(self, params, frozen) -> dict[str, float]:
        if self.objective == "lm":
            return self._lm(params, frozen)
        return self._vq(params, frozen)

    def _lm(self, params, frozen) -> dict[str, float]:
        rows = []
        for b, host in zip(self.device_batches, self.batches):
            out = _gather(self._fn(params, frozen, sharding.put_batch(b, self.mesh)))
            rows.append({**{k: np.asarray(v) for k, v in out.items()}, "kind": host["kind"]})
        r = {k: np.concatenate([x[k] for x in rows]) for k in rows[0]}
        answered = r["answered"].astype(bool)
        scores = {"accuracy": float(r["correct"][answered].mean()) if answered.any() else float("nan"),
                  "loss_text": float(r["text_ce_sum"].sum() / max(r["text_tokens"].sum(), 1)),
                  "loss_image": float(r["image_ce_sum"].sum() / max(r["image_tokens"].sum(), 1)),
                  **self.blind}
        for i, kind in enumerate(self.kinds):
            sel = answered & (r["kind"] == i)
            if sel.any():
                scores[f"accuracy_{kind}"] = float(r["correct"][sel].mean())
                scores[f"answer_mode/{kind}"] = answer_mode_share(r["first_answer"][sel])
        if "router_hits" in r:  # TA-MoE: task-router accuracy per layer, expert load shares per group
            acc = r["router_hits"].sum(0) / max(r["router_tokens"].sum(), 1)
            scores["router_acc"] = float(acc.mean())
            scores.update({f"router_acc/layer{i}": float(a) for i, a in enumerate(acc)})
            load = r["expert_load"].sum(0)                              # [L, 2N]
            n = load.shape[1] // 2
            for i, row in enumerate(load):
                for g, name in enumerate(("mmu", "t2i")):
                    share = row[g * n:(g + 1) * n] / max(row[g * n:(g + 1) * n].sum(), 1)
                    scores.update({f"load/layer{i}/{name}{e}": float(v) for e, v in enumerate(share)})
        return scores

    def _vq(self, params, frozen) -> dict[str, float]:
        bs = self.config.train.batch_size
        recons = [np.asarray(jax.device_get(self._fn(params, frozen, self.images[i:i + bs])))
                  for i in range(0, len(self.images), bs)]
        recon = np.concatenate(recons)
        pixels = np.clip(np.round((recon + 1) * 127.5), 0, 255).astype(np.uint8)
        matched = [shapes.match_scene(s, shapes.detect(p)) for s, p in zip(self.scenes, pixels)]
        return {"recon_mse": float(np.mean((recon - self.images) ** 2)), "detector_match": float(np.mean(matched))}
