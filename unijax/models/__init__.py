"""Flax NNX modules. Parameters carry *logical* axis names in `out_sharding` metadata; they are
placed on a mesh explicitly by `unijax.sharding` (jit out_shardings), never eagerly at creation."""

from flax import nnx

nnx.use_eager_sharding(False)
