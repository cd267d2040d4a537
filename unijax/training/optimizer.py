"""optax AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax


def learning_rate(train_cfg) -> optax.Schedule:
    """Linear warmup to `train.learning_rate` over `train.warmup_steps`, then cosine decay to
    `train.learning_rate * train.min_lr_ratio` at `train.steps`."""
    peak = float(train_cfg.learning_rate)
    warmup = min(int(train_cfg.warmup_steps), max(int(train_cfg.steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(int(train_cfg.steps), warmup + 1),
                                              end_value=peak * float(train_cfg.min_lr_ratio))


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings, convolutions); none on norms and biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(float(train_cfg.grad_clip)),
        optax.adamw(learning_rate(train_cfg), b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                    eps=float(train_cfg.eps), weight_decay=float(train_cfg.weight_decay), mask=decay_mask),
    )
