"""optax AdamW with linear warmup + cosine decay, global-norm clipping, a weight-decay mask and
optional per-parameter-group learning-rate scales (`train.lr_scales`)."""

from __future__ import annotations

import re

import jax
import optax

from unijax.training.params import path_str


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


def parse_lr_scales(spec) -> list[tuple[re.Pattern, float]]:
    """`train.lr_scales`: "regex=factor" entries (a tuple, or one comma-separated string) over
    parameter paths (`vision_model/.*=5`); the first matching entry scales a parameter's updates."""
    if isinstance(spec, str):
        spec = [s for s in spec.split(",") if s]
    out = []
    for entry in spec:
        pattern, sep, factor = str(entry).rpartition("=")
        try:
            out.append((re.compile(pattern), float(factor)))
        except (re.error, ValueError):
            sep = ""
        if not sep or not pattern:
            raise ValueError(f"train.lr_scales: bad entry {entry!r}; expected 'regex=factor', e.g. 'vision_model/.*=5'")
    return out


def scale_by_path(scales: list[tuple[re.Pattern, float]]) -> optax.GradientTransformation:
    """Multiplies each parameter's update by the factor of the first regex its path matches (1 if
    none): after AdamW, that is a per-group learning rate (weight decay scales with it, as with lr)."""
    def factor(path) -> float:
        s = path_str(path)
        return next((f for r, f in scales if r.fullmatch(s)), 1.0)

    if not scales:
        return optax.stateless(lambda updates, params=None: updates)
    return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(
        lambda path, u: u * factor(path) if factor(path) != 1.0 else u, updates))


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    # the path scaling is always in the chain (stateless; identity without scales), so setting
    # train.lr_scales on a resumed run keeps the optimizer state's structure
    return optax.chain(
        optax.clip_by_global_norm(float(train_cfg.grad_clip)),
        optax.adamw(learning_rate(train_cfg), b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                    eps=float(train_cfg.eps), weight_decay=float(train_cfg.weight_decay), mask=decay_mask),
        scale_by_path(parse_lr_scales(train_cfg.get("lr_scales") or ())),
    )
