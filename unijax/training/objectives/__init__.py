"""Training objectives: `train.objective` names one, and the step builder, gradient accumulation and
the loop ask it for everything that differs between objectives.

    obj = objectives.get(config)             # the configured objective
    loss_fn, eval_fn = obj.functions(config, images_per_row, num_layers)

An objective owns:
- its loss `loss_fn(model, batch, whole=None, reference=None) -> (loss, metrics)` (`whole`: the
  update's batch when `batch` is one micro-batch of it; `reference`: the frozen reference model, for
  objectives with `uses_reference`) and its per-row held-out metrics `eval_fn(model, batch)`;
- its data: which raw samples it trains on (`datasets`) and how a sample becomes a batch row
  (`encoder`, `batch_spec`); by default the supervised samples of `data.*` and the batch contract
  of `unijax.contract`;
- its config checks (`check`).

Task ids (MMU / T2I, the TA-MoE groups; `unijax.contract`) are not objectives: every objective
trains either task. Built in: `lm` (next-token on both tasks), `vq` (stage 0: the VQ tokenizer) and
`dpo` (preference pairs for both tasks: `unijax.training.objectives.dpo`). A new objective is one
module with an `Objective` subclass passed to `register`.
"""

from __future__ import annotations

from typing import ClassVar

from unijax.data import datasets, pipeline

__all__ = ["Objective", "get", "names", "register"]


class Objective:
    """One training objective (see the module docstring). Subclasses set `name` and `functions`."""

    name: ClassVar[str] = ""
    heldout: ClassVar[str] = ""  # which built-in shapes held-out evaluation applies: "lm", "vq" or "" (none)
    uses_reference: ClassVar[bool] = False  # the loss compares against the frozen starting model

    def check(self, config) -> None:
        """Refuses settings this objective cannot train with (named by their config key)."""

    def functions(self, config, images_per_row: tuple[int, int], num_layers: int = 0):
        """-> (loss_fn, eval_fn or None)."""
        raise NotImplementedError

    def datasets(self, config, image_size: int, seed: int, **kw):
        """-> (random-access datasets of raw samples, their mixing weights) (`datasets.task_datasets`'s
        keywords: `part`, `turns`, `mix`)."""
        return datasets.task_datasets(config.data, image_size, seed, **kw)

    def encoder(self, tokenizer, layout: pipeline.Layout, kinds=()):
        """A grain `RandomMap` from a raw sample to one padded batch row, or None for the batch
        contract's (`pipeline.EncodeSample`, then padding or packing)."""
        return None

    def batch_spec(self, layout: pipeline.Layout, batch_size: int) -> dict:
        """`{key: (shape, dtype)}` of a batch, what the step compiles for."""
        return pipeline.batch_spec(layout, batch_size)


_REGISTRY: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
    if not obj.name:
        raise ValueError(f"{type(obj).__name__}.name is empty")
    old = _REGISTRY.get(obj.name)
    if old is not None and type(old) is not type(obj):
        raise ValueError(f"objective {obj.name!r} is already registered by {type(old).__name__}")
    _REGISTRY[obj.name] = obj
    return obj


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(config_or_name) -> Objective:
    """The objective `train.objective` of an experiment config (or by name)."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.train.objective
    if name not in _REGISTRY:
        raise ValueError(f"train.objective={name!r}: expected one of {names()}")
    return _REGISTRY[name]


def functions(config, images_per_row: tuple[int, int], num_layers: int = 0):
    """The configured objective's (loss_fn, eval_fn)."""
    return get(config).functions(config, images_per_row, num_layers)


# the built-in objectives register themselves
from unijax.training.objectives import dpo, lm, vq  # noqa: E402,F401
