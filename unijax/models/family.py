"""Model families by config: `Janus` (`JanusConfig`) and `Emu3` (`Emu3Config`, `family == "emu3"`).

Checkpoints (`model.json`), conversion and the training loop go through these two functions, so
a new family is one more branch here, not a change in their callers.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

FAMILIES = ("janus", "emu3")


def family_of(cfg) -> str:
    return getattr(cfg, "family", "janus")


def config_from_dict(d: Mapping[str, Any], *, where: str = "model"):
    """A `model.json` / preset mapping -> its family's config (`family` key; absent = janus)."""
    family = d.get("family", "janus")
    if family == "emu3":
        from unijax.models.emu3_config import Emu3Config

        return Emu3Config.from_dict(d, where=where)
    if family != "janus":
        raise ValueError(f"{where}.family={family!r} is not one of {FAMILIES}")
    from unijax.models.config import JanusConfig

    return JanusConfig.from_dict({k: v for k, v in d.items() if k != "family"}, where=where)


def build(cfg, rngs: nnx.Rngs) -> nnx.Module:
    if family_of(cfg) == "emu3":
        from unijax.models.emu3 import Emu3

        return Emu3(cfg, rngs=rngs)
    from unijax.models.janus import Janus

    return Janus(cfg, rngs=rngs)
