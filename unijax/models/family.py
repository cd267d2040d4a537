"""Model families by config: `Janus` (`JanusConfig`) and `Emu3` (`Emu3Config`, `family == "emu3"`).

Checkpoints (`model.json`), conversion and the training loop build models through `build`, so a
new family is one more branch here, not a change in their callers. Configs by family:
`unijax.models.presets.config_from_dict`.
"""

from __future__ import annotations

from flax import nnx

from unijax.models.config import FAMILIES, family_of
from unijax.models.emu3 import Emu3
from unijax.models.janus import Janus

__all__ = ["FAMILIES", "build", "family_of"]


def build(cfg, rngs: nnx.Rngs) -> nnx.Module:
    """A freshly initialised model of `cfg`'s family."""
    if family_of(cfg) == "emu3":
        return Emu3(cfg, rngs=rngs)
    return Janus(cfg, rngs=rngs)
